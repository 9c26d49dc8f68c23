//! SIP digest authentication: challenge and credential parsing, response
//! computation, stateless cluster nonces and nonce-count replay protection.
//!
//! This module owns everything between an `Authorization` header value and a
//! yes/no answer, and the client side of the same exchange. It is pure: the
//! clock (`now`, Unix seconds) and random bytes come in as arguments, and it
//! works on header *values* (`&str`), so it does not depend on the message
//! type.
//!
//! - Parsing: RFC 3261 §25.1 (`challenge`, `credentials`, `digest-response`),
//!   RFC 7235 §2.1 (auth-param lists), RFC 7616 §3.3–§3.4 (directives).
//!   A credential with an unknown scheme parses to [`Credentials::Other`], so a
//!   registrar can ignore it and challenge instead of answering 400.
//! - Computation: RFC 3261 §22.4, RFC 2617 §3.2.2, RFC 7616 §3.4.1–§3.4.3
//!   ([`ha1`], [`ha2`], [`response`]), MD5 and SHA-256 (RFC 8760), and their
//!   `-sess` variants.
//! - Stateless nonces ([`NonceKey`]): any node holding the cluster secret can
//!   verify a nonce any other node issued, with no shared state:
//!
//!   ```text
//!    0               8               16                              32
//!   +---------------+---------------+-------------------------------+
//!   | issued_at u64 | random 8 B    | HMAC-SHA256(secret, 0..16)    |
//!   | (big endian)  |               | truncated to 16 bytes         |
//!   +---------------+---------------+-------------------------------+
//!                    nonce = lowercase hex of the 32 bytes
//!   ```
//!
//! - Replay protection ([`NcWindow`], [`NcTracker`]): each `nc` of a nonce is
//!   accepted once, out of order within 64 values below the highest seen.
//!   The tracker is bounded and only holds nonces whose response verified.
//! - Server side: [`Verifier`] (stores only HA1, never the password).
//! - Client side: [`respond`] for the test UA.
//!
//! Limits: `qop=auth-int` and `username*` (RFC 7616 §3.4.4) are not
//! supported. The nonce-count tracker is local to a node: a request replayed
//! to a *different* node within the nonce lifetime is not caught by it, so
//! keep `max_age` short (the nonce timestamp bounds the window).
//!
//! # Example
//!
//! ```
//! use sip::auth::{self, Algorithm, Credentials, NcTracker, NonceKey, Verifier};
//!
//! let key = NonceKey::new(b"cluster secret, at least 16 bytes").expect("long secret");
//! let mut verifier = Verifier::new(key, "sipzone.local", 300, NcTracker::new(10_000));
//! let challenge = verifier.challenge(1_000, [7; 8], false, Algorithm::Sha256);
//!
//! let value = auth::respond(&challenge, "REGISTER", "sip:sipzone.local", "alice", "pw", "c1", 1)
//!     .expect("challenge offers qop=auth");
//! let Ok(Credentials::Digest(creds)) = Credentials::parse(&value) else { panic!() };
//! let stored_ha1 = auth::ha1(Algorithm::Sha256, "alice", "sipzone.local", "pw");
//! assert!(verifier.verify(1_001, "REGISTER", &creds, &stored_ha1).is_ok());
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use hmac::{Hmac, KeyInit, Mac};
use md5::Md5;
use sha2::{Digest, Sha256};

/// Maximum number of auth-params accepted in one header value.
pub const MAX_PARAMS: usize = 32;

/// How far (seconds) a nonce's timestamp may lie in the future of `now`
/// before it is treated as forged; absorbs clock skew between cluster nodes.
pub const NONCE_CLOCK_SKEW_SECS: u64 = 30;

/// Width of the out-of-order nonce-count window (RFC 7616 §3.4.5 leaves the
/// policy to the server; 64 is the IPsec anti-replay default).
pub const NC_WINDOW: u32 = 64;

/// Length in bytes of a decoded nonce: timestamp, random, truncated MAC.
const NONCE_BYTES: usize = 32;

/// Errors from parsing auth headers and building auth state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The header value is not a well-formed `scheme auth-param, ...` list.
    #[error("malformed auth header at byte {pos}: expected {expected}")]
    Syntax {
        /// Byte offset in the header value where parsing stopped.
        pos: usize,
        /// What the parser expected there.
        expected: &'static str,
    },
    /// A quoted-string is not closed before the end of the value.
    #[error("unterminated quoted string starting at byte {pos}")]
    UnterminatedQuote {
        /// Byte offset of the opening quote.
        pos: usize,
    },
    /// An auth-param name occurs twice (RFC 7235 §2.1 forbids it).
    #[error("duplicate auth-param {0:?}")]
    DuplicateParam(String),
    /// More than [`MAX_PARAMS`] auth-params.
    #[error("too many auth-params (limit {MAX_PARAMS})")]
    TooManyParams,
    /// A mandatory directive is absent.
    #[error("missing mandatory auth-param {0:?}")]
    MissingParam(&'static str),
    /// A challenge uses a scheme other than `Digest`.
    #[error("unsupported auth scheme {0:?}")]
    UnsupportedScheme(String),
    /// The `algorithm` directive names an algorithm this module cannot compute.
    #[error("unsupported digest algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    /// The credentials' `qop` is not `auth` (e.g. `auth-int`).
    #[error("unsupported qop {0:?}")]
    UnsupportedQop(String),
    /// The `nc` directive is not 8 hex digits.
    #[error("invalid nonce count {0:?}")]
    InvalidNonceCount(String),
    /// A challenge offers only qop options this client cannot answer
    /// (`auth-int`), or a `-sess` algorithm without qop.
    #[error("challenge offers no usable qop")]
    NoUsableQop,
    /// The nonce secret is shorter than [`NonceKey::MIN_SECRET_LEN`] bytes.
    #[error("nonce secret too short: {len} bytes (minimum {min})", min = NonceKey::MIN_SECRET_LEN)]
    WeakSecret {
        /// Length of the secret that was given.
        len: usize,
    },
}

impl AuthError {
    /// The SIP status code to answer a request whose auth header failed to
    /// parse with (400), or 500 for local configuration errors.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::NoUsableQop | AuthError::WeakSecret { .. } => 500,
            _ => 400,
        }
    }
}

/// A digest algorithm (RFC 7616 §3.3, RFC 8760).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// `MD5`, the RFC 3261 default when `algorithm` is absent.
    Md5,
    /// `MD5-sess` (RFC 2617 §3.2.2.2).
    Md5Sess,
    /// `SHA-256` (RFC 7616, RFC 8760).
    Sha256,
    /// `SHA-256-sess` (RFC 7616 §3.4.2).
    Sha256Sess,
}

impl Algorithm {
    /// The token as written in the `algorithm` directive.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Md5Sess => "MD5-sess",
            Algorithm::Sha256 => "SHA-256",
            Algorithm::Sha256Sess => "SHA-256-sess",
        }
    }

    /// Whether this is a `-sess` variant (HA1 mixes in nonce and cnonce).
    pub fn is_sess(self) -> bool {
        matches!(self, Algorithm::Md5Sess | Algorithm::Sha256Sess)
    }

    /// Length of a hex digest of this algorithm's hash (32 or 64).
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Md5 | Algorithm::Md5Sess => 32,
            Algorithm::Sha256 | Algorithm::Sha256Sess => 64,
        }
    }

    /// `H(parts joined by ':')` as lowercase hex.
    fn hash(self, parts: &[&str]) -> String {
        fn feed<D: Digest>(parts: &[&str]) -> String {
            let mut d = D::new();
            for (i, p) in parts.iter().enumerate() {
                if i > 0 {
                    d.update(b":");
                }
                d.update(p.as_bytes());
            }
            hex::encode(d.finalize().as_slice())
        }
        match self {
            Algorithm::Md5 | Algorithm::Md5Sess => feed::<Md5>(parts),
            Algorithm::Sha256 | Algorithm::Sha256Sess => feed::<Sha256>(parts),
        }
    }
}

impl FromStr for Algorithm {
    type Err = AuthError;

    fn from_str(s: &str) -> Result<Self, AuthError> {
        [
            Algorithm::Md5,
            Algorithm::Md5Sess,
            Algorithm::Sha256,
            Algorithm::Sha256Sess,
        ]
        .into_iter()
        .find(|a| a.as_str().eq_ignore_ascii_case(s))
        .ok_or_else(|| AuthError::UnsupportedAlgorithm(s.to_owned()))
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A quality-of-protection option (RFC 7616 §3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qop {
    /// `auth`: authentication only.
    Auth,
    /// `auth-int`: authentication with body integrity (parsed, not computed).
    AuthInt,
}

impl Qop {
    /// The token as written in the `qop` directive.
    pub fn as_str(self) -> &'static str {
        match self {
            Qop::Auth => "auth",
            Qop::AuthInt => "auth-int",
        }
    }

    fn parse(s: &str) -> Option<Qop> {
        if s.eq_ignore_ascii_case("auth") {
            Some(Qop::Auth)
        } else if s.eq_ignore_ascii_case("auth-int") {
            Some(Qop::AuthInt)
        } else {
            None
        }
    }
}

/// A `Digest` challenge from `WWW-Authenticate` / `Proxy-Authenticate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Protection space, shown to users and mixed into HA1.
    pub realm: String,
    /// Server nonce.
    pub nonce: String,
    /// Opaque data the client echoes back unchanged.
    pub opaque: Option<String>,
    /// Hash algorithm (MD5 when the directive is absent).
    pub algorithm: Algorithm,
    /// Offered qop options, unknown ones dropped; empty means RFC 2069 mode.
    pub qop: Vec<Qop>,
    /// The previous request's nonce was stale but its digest was valid.
    pub stale: bool,
    /// The server wants the username hashed (RFC 7616 §3.4.4).
    pub userhash: bool,
}

impl Challenge {
    /// Parses a `WWW-Authenticate` / `Proxy-Authenticate` header value.
    ///
    /// Unknown directives and unknown qop options are ignored (RFC 7616
    /// §3.3); a scheme other than `Digest` is [`AuthError::UnsupportedScheme`].
    pub fn parse(value: &str) -> Result<Challenge, AuthError> {
        let (scheme, mut cur) = scheme(value)?;
        if !scheme.eq_ignore_ascii_case("digest") {
            return Err(AuthError::UnsupportedScheme(scheme.to_owned()));
        }
        let mut p = params(&mut cur)?;
        let realm = p.take("realm").ok_or(AuthError::MissingParam("realm"))?;
        let nonce = p.take("nonce").ok_or(AuthError::MissingParam("nonce"))?;
        let algorithm = match p.take("algorithm") {
            Some(a) => a.parse()?,
            None => Algorithm::Md5,
        };
        let qop = p
            .take("qop")
            .map(|q| {
                q.split(',')
                    .filter_map(|o| Qop::parse(o.trim_matches(is_lws)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Challenge {
            realm,
            nonce,
            opaque: p.take("opaque"),
            algorithm,
            qop,
            stale: p.flag("stale"),
            userhash: p.flag("userhash"),
        })
    }

    /// Formats this challenge as a header value, e.g.
    /// `Digest realm="sipzone.local", nonce="…", algorithm=SHA-256, qop="auth"`.
    pub fn to_header_value(&self) -> String {
        let mut parts = vec![
            format!("realm={}", quote(&self.realm)),
            format!("nonce={}", quote(&self.nonce)),
        ];
        if let Some(o) = &self.opaque {
            parts.push(format!("opaque={}", quote(o)));
        }
        parts.push(format!("algorithm={}", self.algorithm));
        if !self.qop.is_empty() {
            let opts: Vec<&str> = self.qop.iter().map(|q| q.as_str()).collect();
            parts.push(format!("qop={}", quote(&opts.join(","))));
        }
        if self.stale {
            parts.push("stale=true".to_owned());
        }
        if self.userhash {
            parts.push("userhash=true".to_owned());
        }
        format!("Digest {}", parts.join(", "))
    }
}

/// A parsed `Authorization` / `Proxy-Authorization` header value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// `Digest` credentials.
    Digest(DigestCredentials),
    /// Any other scheme: not an error, so the server can ignore it and
    /// challenge (RFC 3261 §22.1).
    Other {
        /// The scheme name as received.
        scheme: String,
    },
}

impl Credentials {
    /// Parses an `Authorization` / `Proxy-Authorization` header value.
    ///
    /// Only `Digest` parameters are examined; the rest of an unknown scheme's
    /// value is not parsed at all.
    pub fn parse(value: &str) -> Result<Credentials, AuthError> {
        let (scheme, mut cur) = scheme(value)?;
        if !scheme.eq_ignore_ascii_case("digest") {
            return Ok(Credentials::Other {
                scheme: scheme.to_owned(),
            });
        }
        let mut p = params(&mut cur)?;
        let username = p
            .take("username")
            .ok_or(AuthError::MissingParam("username"))?;
        let realm = p.take("realm").ok_or(AuthError::MissingParam("realm"))?;
        let nonce = p.take("nonce").ok_or(AuthError::MissingParam("nonce"))?;
        let uri = p.take("uri").ok_or(AuthError::MissingParam("uri"))?;
        let response = p
            .take("response")
            .ok_or(AuthError::MissingParam("response"))?;
        let algorithm = match p.take("algorithm") {
            Some(a) => a.parse()?,
            None => Algorithm::Md5,
        };
        let qop = match p.take("qop") {
            None => None,
            Some(q) => match Qop::parse(&q) {
                Some(Qop::Auth) => Some(Qop::Auth),
                _ => return Err(AuthError::UnsupportedQop(q)),
            },
        };
        let cnonce = p.take("cnonce");
        let nc = p.take("nc");
        if let Some(nc) = &nc
            && parse_nc(nc).is_none()
        {
            return Err(AuthError::InvalidNonceCount(nc.clone()));
        }
        if qop.is_some() {
            if cnonce.is_none() {
                return Err(AuthError::MissingParam("cnonce"));
            }
            if nc.is_none() {
                return Err(AuthError::MissingParam("nc"));
            }
        }
        Ok(Credentials::Digest(DigestCredentials {
            username,
            realm,
            nonce,
            uri,
            response,
            algorithm,
            cnonce,
            opaque: p.take("opaque"),
            qop,
            nc,
            userhash: p.flag("userhash"),
        }))
    }
}

/// `Digest` credentials (RFC 3261 §25.1 `digest-response`, RFC 7616 §3.4).
#[derive(Clone, PartialEq, Eq)]
pub struct DigestCredentials {
    /// User name, or `H(username:realm)` when `userhash` is set.
    pub username: String,
    /// Realm the credentials are for.
    pub realm: String,
    /// Server nonce being answered.
    pub nonce: String,
    /// `digest-uri` the client hashed into HA2.
    pub uri: String,
    /// The request digest, lowercase hex.
    pub response: String,
    /// Hash algorithm (MD5 when the directive is absent).
    pub algorithm: Algorithm,
    /// Client nonce, present with qop.
    pub cnonce: Option<String>,
    /// Echo of the challenge's opaque.
    pub opaque: Option<String>,
    /// Chosen qop; only `auth` parses.
    pub qop: Option<Qop>,
    /// Nonce count as sent (8 hex digits), present with qop.
    pub nc: Option<String>,
    /// `username` is hashed (RFC 7616 §3.4.4).
    pub userhash: bool,
}

impl fmt::Debug for DigestCredentials {
    // The response digest allows an offline dictionary attack on the password,
    // so it never reaches logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DigestCredentials")
            .field("username", &self.username)
            .field("realm", &self.realm)
            .field("nonce", &self.nonce)
            .field("uri", &self.uri)
            .field("response", &"<redacted>")
            .field("algorithm", &self.algorithm)
            .field("cnonce", &self.cnonce)
            .field("opaque", &self.opaque)
            .field("qop", &self.qop)
            .field("nc", &self.nc)
            .field("userhash", &self.userhash)
            .finish()
    }
}

impl DigestCredentials {
    /// The nonce count as a number, if present and well formed.
    pub fn nc_value(&self) -> Option<u32> {
        self.nc.as_deref().and_then(parse_nc)
    }

    /// Formats these credentials as an `Authorization` header value.
    pub fn to_header_value(&self) -> String {
        let mut parts = vec![
            format!("username={}", quote(&self.username)),
            format!("realm={}", quote(&self.realm)),
            format!("nonce={}", quote(&self.nonce)),
            format!("uri={}", quote(&self.uri)),
            format!("response={}", quote(&self.response)),
            format!("algorithm={}", self.algorithm),
        ];
        if let Some(c) = &self.cnonce {
            parts.push(format!("cnonce={}", quote(c)));
        }
        if let Some(o) = &self.opaque {
            parts.push(format!("opaque={}", quote(o)));
        }
        if let Some(q) = self.qop {
            parts.push(format!("qop={}", q.as_str()));
        }
        if let Some(nc) = &self.nc {
            parts.push(format!("nc={nc}"));
        }
        if self.userhash {
            parts.push("userhash=true".to_owned());
        }
        format!("Digest {}", parts.join(", "))
    }
}

// ---------------------------------------------------------------------------
// Computation (RFC 7616 §3.4.1–§3.4.3)
// ---------------------------------------------------------------------------

/// `HA1 = H(username:realm:password)`, lowercase hex. For `-sess` algorithms
/// this is the stored base value; see [`session_ha1`].
pub fn ha1(alg: Algorithm, username: &str, realm: &str, password: &str) -> String {
    alg.hash(&[username, realm, password])
}

/// The `-sess` HA1, `H(HA1:nonce:cnonce)`; returns `ha1` unchanged for
/// non-`-sess` algorithms.
pub fn session_ha1(alg: Algorithm, ha1: &str, nonce: &str, cnonce: &str) -> String {
    if alg.is_sess() {
        alg.hash(&[ha1, nonce, cnonce])
    } else {
        ha1.to_owned()
    }
}

/// `HA2 = H(method:digest-uri)` for `qop=auth` or no qop, lowercase hex.
pub fn ha2(alg: Algorithm, method: &str, uri: &str) -> String {
    alg.hash(&[method, uri])
}

/// `H(username:realm)`, the hashed username of RFC 7616 §3.4.4.
pub fn userhash(alg: Algorithm, username: &str, realm: &str) -> String {
    alg.hash(&[username, realm])
}

/// The `qop=auth` inputs of a response digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QopAuth<'a> {
    /// Nonce count exactly as sent (8 hex digits).
    pub nc: &'a str,
    /// Client nonce.
    pub cnonce: &'a str,
}

/// The request digest: `KD(HA1, nonce:nc:cnonce:auth:HA2)` with qop, or
/// `KD(HA1, nonce:HA2)` without (RFC 2069 compatibility). `ha1` is the
/// session HA1 for `-sess` algorithms.
pub fn response(
    alg: Algorithm,
    ha1: &str,
    nonce: &str,
    qop: Option<QopAuth<'_>>,
    ha2: &str,
) -> String {
    match qop {
        Some(q) => alg.hash(&[ha1, nonce, q.nc, q.cnonce, Qop::Auth.as_str(), ha2]),
        None => alg.hash(&[ha1, nonce, ha2]),
    }
}

/// Compares two hex digests in time independent of where they differ
/// (`received` may be upper case).
fn ct_eq_hex(expected: &str, received: &str) -> bool {
    let (a, b) = (expected.as_bytes(), received.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | (x ^ y.to_ascii_lowercase()));
    std::hint::black_box(diff) == 0
}

/// Parses an `nc-value`: exactly 8 hex digits.
fn parse_nc(s: &str) -> Option<u32> {
    if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

// ---------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------

/// Answers `challenge` for a request `method uri`, as [`DigestCredentials`].
///
/// Uses `qop=auth` when offered (with `cnonce` and `nc`), RFC 2069 mode when
/// the challenge offers no qop, and hashes the username if asked to.
pub fn respond_credentials(
    challenge: &Challenge,
    method: &str,
    uri: &str,
    username: &str,
    password: &str,
    cnonce: &str,
    nc: u32,
) -> Result<DigestCredentials, AuthError> {
    let alg = challenge.algorithm;
    let qop = if challenge.qop.is_empty() {
        None
    } else if challenge.qop.contains(&Qop::Auth) {
        Some(Qop::Auth)
    } else {
        return Err(AuthError::NoUsableQop);
    };
    if alg.is_sess() && qop.is_none() {
        return Err(AuthError::NoUsableQop);
    }
    let nc = format!("{nc:08x}");
    let base = ha1(alg, username, &challenge.realm, password);
    let effective = session_ha1(alg, &base, &challenge.nonce, cnonce);
    let qop_auth = qop.map(|_| QopAuth { nc: &nc, cnonce });
    let digest = response(
        alg,
        &effective,
        &challenge.nonce,
        qop_auth,
        &ha2(alg, method, uri),
    );
    let username = if challenge.userhash {
        userhash(alg, username, &challenge.realm)
    } else {
        username.to_owned()
    };
    Ok(DigestCredentials {
        username,
        realm: challenge.realm.clone(),
        nonce: challenge.nonce.clone(),
        uri: uri.to_owned(),
        response: digest,
        algorithm: alg,
        cnonce: qop.map(|_| cnonce.to_owned()),
        opaque: challenge.opaque.clone(),
        qop,
        nc: qop.map(|_| nc),
        userhash: challenge.userhash,
    })
}

/// Answers `challenge` for a request `method uri` with an `Authorization`
/// (or `Proxy-Authorization`) header value; see [`respond_credentials`].
pub fn respond(
    challenge: &Challenge,
    method: &str,
    uri: &str,
    username: &str,
    password: &str,
    cnonce: &str,
    nc: u32,
) -> Result<String, AuthError> {
    respond_credentials(challenge, method, uri, username, password, cnonce, nc)
        .map(|c| c.to_header_value())
}

// ---------------------------------------------------------------------------
// Stateless nonces
// ---------------------------------------------------------------------------

/// Issues and checks nonces with a cluster-wide secret, so any node can
/// verify a nonce another node issued without shared state.
#[derive(Clone)]
pub struct NonceKey {
    /// HMAC keyed with the secret, cloned per use.
    mac: Hmac<Sha256>,
}

impl fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NonceKey(<secret>)")
    }
}

/// The verdict of [`NonceKey::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceStatus {
    /// Genuine and fresh.
    Valid {
        /// Unix seconds at which the nonce was issued.
        issued_at: u64,
    },
    /// Genuine but older than the maximum age: challenge again with
    /// `stale=true`.
    Stale {
        /// Unix seconds at which the nonce was issued.
        issued_at: u64,
    },
    /// Malformed, forged, altered, or issued too far in the future.
    Invalid,
}

impl NonceKey {
    /// Minimum secret length in bytes.
    pub const MIN_SECRET_LEN: usize = 16;

    /// Builds a key from the cluster secret (at least
    /// [`Self::MIN_SECRET_LEN`] bytes).
    pub fn new(secret: &[u8]) -> Result<NonceKey, AuthError> {
        let weak = AuthError::WeakSecret { len: secret.len() };
        if secret.len() < Self::MIN_SECRET_LEN {
            return Err(weak);
        }
        let mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| weak)?;
        Ok(NonceKey { mac })
    }

    /// Issues a nonce stamped `now_unix_secs`, with 8 caller-supplied random
    /// bytes: 64 lowercase hex characters.
    pub fn issue(&self, now_unix_secs: u64, random: [u8; 8]) -> String {
        let mut raw = [0u8; NONCE_BYTES];
        raw[..8].copy_from_slice(&now_unix_secs.to_be_bytes());
        raw[8..16].copy_from_slice(&random);
        let tag = self
            .mac
            .clone()
            .chain_update(&raw[..16])
            .finalize()
            .into_bytes();
        raw[16..].copy_from_slice(&tag[..16]);
        hex::encode(raw)
    }

    /// Checks a nonce: `Invalid` if it was not issued with this secret (or
    /// lies more than [`NONCE_CLOCK_SKEW_SECS`] in the future), `Stale` if
    /// older than `max_age_secs`, `Valid` otherwise.
    pub fn check(&self, nonce: &str, now_unix_secs: u64, max_age_secs: u64) -> NonceStatus {
        let mut raw = [0u8; NONCE_BYTES];
        if nonce.len() != 2 * NONCE_BYTES || hex::decode_to_slice(nonce, &mut raw).is_err() {
            return NonceStatus::Invalid;
        }
        let genuine = self
            .mac
            .clone()
            .chain_update(&raw[..16])
            .verify_truncated_left(&raw[16..])
            .is_ok();
        if !genuine {
            return NonceStatus::Invalid;
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&raw[..8]);
        let issued_at = u64::from_be_bytes(ts);
        if issued_at > now_unix_secs.saturating_add(NONCE_CLOCK_SKEW_SECS) {
            NonceStatus::Invalid
        } else if now_unix_secs.saturating_sub(issued_at) > max_age_secs {
            NonceStatus::Stale { issued_at }
        } else {
            NonceStatus::Valid { issued_at }
        }
    }
}

// ---------------------------------------------------------------------------
// Nonce-count replay protection
// ---------------------------------------------------------------------------

/// Why a nonce count was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NcError {
    /// `nc` is zero; counts start at 1 (RFC 7616 §3.4).
    #[error("nonce count zero")]
    Zero,
    /// This `nc` was already accepted for this nonce.
    #[error("nonce count already used")]
    Repeated,
    /// `nc` is [`NC_WINDOW`] or more below the highest accepted.
    #[error("nonce count below the replay window")]
    BelowWindow,
    /// The tracker dropped (or never could hold) this nonce's window, so it
    /// cannot tell a replay from a first use: challenge with a fresh nonce.
    #[error("nonce no longer tracked")]
    Forgotten,
}

/// Accepted nonce counts of one nonce: a sliding bitmap of [`NC_WINDOW`]
/// values ending at the highest count seen (the RFC 4303 §3.4.3 scheme).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NcWindow {
    /// Highest accepted count; 0 before the first.
    highest: u32,
    /// Bit `i` set means `highest - i` was accepted.
    seen: u64,
}

impl NcWindow {
    /// An empty window.
    pub fn new() -> NcWindow {
        NcWindow::default()
    }

    /// Highest count accepted so far (0 if none).
    pub fn highest(&self) -> u32 {
        self.highest
    }

    /// Accepts `nc` if it was not seen and is within the window; a refusal
    /// leaves the window unchanged.
    pub fn accept(&mut self, nc: u32) -> Result<(), NcError> {
        if nc == 0 {
            return Err(NcError::Zero);
        }
        if nc > self.highest {
            let shift = nc - self.highest;
            self.seen = if shift >= NC_WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.highest = nc;
            return Ok(());
        }
        let back = self.highest - nc;
        if back >= NC_WINDOW {
            return Err(NcError::BelowWindow);
        }
        let bit = 1u64 << back;
        if self.seen & bit != 0 {
            return Err(NcError::Repeated);
        }
        self.seen |= bit;
        Ok(())
    }
}

/// Bounded per-nonce [`NcWindow`]s, ordered by issue time so the oldest goes
/// first when full.
///
/// Entries are keyed by `(issued_at, nonce)`; `issued_at` comes from the
/// authenticated nonce, so lookups and eviction are `O(log n)`. Once a window
/// is evicted, a nonce issued at or before it cannot be told apart from a
/// replay and is refused as [`NcError::Forgotten`] (the verifier answers
/// stale, the client retries with a fresh nonce). An attacker therefore
/// cannot grow memory, and evicting cannot reopen a replay.
#[derive(Debug, Clone)]
pub struct NcTracker {
    entries: BTreeMap<(u64, String), NcWindow>,
    capacity: usize,
    /// Nonces issued before this (Unix seconds) and absent are forgotten.
    floor: u64,
}

impl NcTracker {
    /// A tracker holding at most `capacity` nonces (at least 1).
    pub fn new(capacity: usize) -> NcTracker {
        NcTracker {
            entries: BTreeMap::new(),
            capacity: capacity.max(1),
            floor: 0,
        }
    }

    /// Number of tracked nonces.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no nonce is tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Maximum number of tracked nonces.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Treats every untracked nonce issued before `issued_at` as forgotten;
    /// a driver calls this with its start time after a restart so nonce
    /// counts used before the restart cannot be replayed.
    pub fn raise_floor(&mut self, issued_at: u64) {
        self.floor = self.floor.max(issued_at);
    }

    /// Drops windows of nonces issued before `issued_before`; the nonce check
    /// refuses them as stale already.
    pub fn purge_expired(&mut self, issued_before: u64) {
        self.entries = self.entries.split_off(&(issued_before, String::new()));
    }

    /// Records `nc` for a verified nonce. A refusal leaves the tracker
    /// unchanged.
    pub fn record(&mut self, nonce: &str, issued_at: u64, nc: u32) -> Result<(), NcError> {
        let key = (issued_at, nonce.to_owned());
        if let Some(window) = self.entries.get_mut(&key) {
            return window.accept(nc);
        }
        if issued_at < self.floor {
            return Err(NcError::Forgotten);
        }
        let mut window = NcWindow::new();
        window.accept(nc)?;
        if self.entries.len() >= self.capacity {
            match self.entries.first_key_value() {
                // Evicting a newer window to track an older nonce would only
                // trade one forgotten nonce for another.
                Some((oldest, _)) if key < *oldest => return Err(NcError::Forgotten),
                _ => {}
            }
            if let Some(((evicted, _), _)) = self.entries.pop_first() {
                self.floor = self.floor.max(evicted.saturating_add(1));
            }
        }
        self.entries.insert(key, window);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Server side
// ---------------------------------------------------------------------------

/// Why [`Verifier::verify`] refused credentials. Every variant is answered
/// with a new challenge; only [`Rejection::Stale`] sets `stale=true`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The credentials are for another realm.
    #[error("credentials for another realm")]
    RealmMismatch,
    /// The nonce is malformed, forged, altered or from the future.
    #[error("nonce not issued by this cluster")]
    BadNonce,
    /// The digest is right but the nonce expired (or its count window was
    /// dropped): challenge again with `stale=true`.
    #[error("nonce stale")]
    Stale,
    /// The digest does not match (wrong password, user or digest-uri).
    #[error("response digest mismatch")]
    BadResponse,
    /// The nonce count was already used or is out of the window.
    #[error("nonce count replay: {0}")]
    Replay(NcError),
    /// No usable qop: absent while RFC 2069 mode is off (or with a `-sess`
    /// algorithm), or `auth-int`.
    #[error("qop=auth required")]
    QopRequired,
    /// The `nc` directive is missing or not 8 hex digits.
    #[error("malformed nonce count")]
    BadNonceCount,
    /// The stored HA1 is not hex of the length `creds.algorithm` needs
    /// (server-side data error, e.g. an MD5 HA1 offered for SHA-256).
    #[error("stored HA1 does not fit the credentials' algorithm")]
    StoredHa1Mismatch,
}

impl Rejection {
    /// Whether the new challenge should carry `stale=true`.
    pub fn is_stale(&self) -> bool {
        matches!(self, Rejection::Stale)
    }
}

/// What a successful [`Verifier::verify`] established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// Algorithm the client used.
    pub algorithm: Algorithm,
    /// Unix seconds at which the nonce was issued.
    pub issued_at: u64,
    /// Accepted nonce count (`None` in RFC 2069 mode).
    pub nc: Option<u32>,
}

/// Server side of digest authentication for one realm: issues challenges,
/// verifies credentials against a stored HA1, and tracks nonce counts.
#[derive(Debug, Clone)]
pub struct Verifier {
    nonce_key: NonceKey,
    realm: String,
    max_age_secs: u64,
    tracker: NcTracker,
    allow_rfc2069: bool,
}

impl Verifier {
    /// A verifier for `realm` whose nonces live `max_age_secs`.
    pub fn new(
        nonce_key: NonceKey,
        realm: impl Into<String>,
        max_age_secs: u64,
        tracker: NcTracker,
    ) -> Verifier {
        Verifier {
            nonce_key,
            realm: realm.into(),
            max_age_secs,
            tracker,
            allow_rfc2069: false,
        }
    }

    /// Accepts credentials without qop (RFC 2069). Dangerous: they carry no
    /// nonce count, so a captured request replays freely for the nonce's
    /// lifetime.
    pub fn danger_allow_rfc2069(mut self, allow: bool) -> Verifier {
        self.allow_rfc2069 = allow;
        self
    }

    /// The realm this verifier challenges for.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// Nonce lifetime in seconds.
    pub fn max_age_secs(&self) -> u64 {
        self.max_age_secs
    }

    /// The nonce-count tracker (for gauges).
    pub fn tracker(&self) -> &NcTracker {
        &self.tracker
    }

    /// The nonce-count tracker (e.g. to [`NcTracker::raise_floor`] at start).
    pub fn tracker_mut(&mut self) -> &mut NcTracker {
        &mut self.tracker
    }

    /// A challenge with a fresh nonce, `qop="auth"`.
    pub fn challenge(
        &self,
        now_unix_secs: u64,
        random: [u8; 8],
        stale: bool,
        algorithm: Algorithm,
    ) -> Challenge {
        Challenge {
            realm: self.realm.clone(),
            nonce: self.nonce_key.issue(now_unix_secs, random),
            opaque: None,
            algorithm,
            qop: vec![Qop::Auth],
            stale,
            userhash: false,
        }
    }

    /// The RFC 8760 §2.4 pair: SHA-256 first, then MD5, sharing one nonce;
    /// send each as its own header, in this order.
    pub fn challenges(&self, now_unix_secs: u64, random: [u8; 8], stale: bool) -> Vec<Challenge> {
        let sha = self.challenge(now_unix_secs, random, stale, Algorithm::Sha256);
        let md5 = Challenge {
            algorithm: Algorithm::Md5,
            ..sha.clone()
        };
        vec![sha, md5]
    }

    /// Verifies `creds` for a request with `method`, against `stored_ha1`
    /// (hex `H(username:realm:password)` in `creds.algorithm`'s hash family,
    /// looked up by the caller from `creds.username`).
    ///
    /// The caller also checks that `creds.uri` matches the Request-URI if it
    /// wants that binding. Only a verified response touches the nonce-count
    /// tracker; every refusal leaves the verifier unchanged.
    pub fn verify(
        &mut self,
        now_unix_secs: u64,
        method: &str,
        creds: &DigestCredentials,
        stored_ha1: &str,
    ) -> Result<Verified, Rejection> {
        if creds.realm != self.realm {
            return Err(Rejection::RealmMismatch);
        }
        let (issued_at, stale) =
            match self
                .nonce_key
                .check(&creds.nonce, now_unix_secs, self.max_age_secs)
            {
                NonceStatus::Valid { issued_at } => (issued_at, false),
                NonceStatus::Stale { issued_at } => (issued_at, true),
                NonceStatus::Invalid => return Err(Rejection::BadNonce),
            };
        let alg = creds.algorithm;
        let qop = match (creds.qop, &creds.nc, &creds.cnonce) {
            (Some(Qop::Auth), Some(nc), Some(cnonce)) => {
                let n = parse_nc(nc).ok_or(Rejection::BadNonceCount)?;
                Some((n, QopAuth { nc, cnonce }))
            }
            (Some(Qop::Auth), _, _) => return Err(Rejection::BadNonceCount),
            (Some(Qop::AuthInt), _, _) => return Err(Rejection::QopRequired),
            (None, _, _) if self.allow_rfc2069 && !alg.is_sess() => None,
            (None, _, _) => return Err(Rejection::QopRequired),
        };
        if stored_ha1.len() != alg.hex_len() || !stored_ha1.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Rejection::StoredHa1Mismatch);
        }
        let base = stored_ha1.to_ascii_lowercase();
        let effective = match &qop {
            Some((_, q)) => session_ha1(alg, &base, &creds.nonce, q.cnonce),
            None => base,
        };
        let expected = response(
            alg,
            &effective,
            &creds.nonce,
            qop.map(|(_, q)| q),
            &ha2(alg, method, &creds.uri),
        );
        if !ct_eq_hex(&expected, &creds.response) {
            return Err(Rejection::BadResponse);
        }
        // RFC 7616 §3.3: stale only once the digest proved the password.
        if stale {
            return Err(Rejection::Stale);
        }
        let nc = match qop {
            Some((n, _)) => {
                self.tracker
                    .purge_expired(now_unix_secs.saturating_sub(self.max_age_secs));
                match self.tracker.record(&creds.nonce, issued_at, n) {
                    Ok(()) => Some(n),
                    Err(NcError::Forgotten) => return Err(Rejection::Stale),
                    Err(e) => return Err(Rejection::Replay(e)),
                }
            }
            None => None,
        };
        Ok(Verified {
            algorithm: alg,
            issued_at,
            nc,
        })
    }
}

// ---------------------------------------------------------------------------
// Parser (RFC 3261 §25.1, RFC 7235 §2.1)
// ---------------------------------------------------------------------------

/// RFC 3261 `token` characters.
fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            '-' | '.' | '!' | '%' | '*' | '_' | '+' | '`' | '\'' | '~'
        )
}

/// Linear white space; CR and LF are tolerated in case a folded value was
/// not unfolded upstream.
fn is_lws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// Characters of an unquoted parameter value. Looser than `token` so that
/// common unquoted `uri=sip:a@b;x=y` values from lenient UAs still parse.
fn is_bare_value_char(c: char) -> bool {
    !is_lws(c) && !c.is_control() && c != ',' && c != '"'
}

/// Quotes `v` as a quoted-string, escaping `"` and `\`. Control characters
/// cannot be escaped in SIP (RFC 3261 §25.1 `quoted-pair`) and are dropped so
/// a value can never break the header line.
fn quote(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() && c != '\t' => {}
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A position in a header value; never panics on any input.
struct Cursor<'a> {
    input: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<char> {
        self.input.get(self.pos..).and_then(|r| r.chars().next())
    }

    fn bump(&mut self, c: char) {
        self.pos += c.len_utf8();
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> &'a str {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if !f(c) {
                break;
            }
            self.bump(c);
        }
        self.input.get(start..self.pos).unwrap_or("")
    }

    fn skip_lws(&mut self) {
        self.take_while(is_lws);
    }

    fn token(&mut self) -> Option<&'a str> {
        Some(self.take_while(is_token_char)).filter(|t| !t.is_empty())
    }

    fn syntax(&self, expected: &'static str) -> AuthError {
        AuthError::Syntax {
            pos: self.pos,
            expected,
        }
    }

    /// A quoted-string with quoted-pair escapes; the cursor is on the `"`.
    fn quoted(&mut self) -> Result<String, AuthError> {
        let open = self.pos;
        self.bump('"');
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return Err(AuthError::UnterminatedQuote { pos: open }),
                Some('"') => {
                    self.bump('"');
                    return Ok(out);
                }
                Some('\\') => {
                    self.bump('\\');
                    let c = self
                        .peek()
                        .ok_or(AuthError::UnterminatedQuote { pos: open })?;
                    out.push(c);
                    self.bump(c);
                }
                Some(c) => {
                    out.push(c);
                    self.bump(c);
                }
            }
        }
    }
}

/// Reads the auth scheme; the cursor is left after it.
fn scheme(value: &str) -> Result<(&str, Cursor<'_>), AuthError> {
    let mut cur = Cursor {
        input: value,
        pos: 0,
    };
    cur.skip_lws();
    let scheme = cur.token().ok_or(cur.syntax("auth scheme"))?;
    Ok((scheme, cur))
}

/// Auth-params with lowercased names.
struct Params(Vec<(String, String)>);

impl Params {
    fn take(&mut self, name: &str) -> Option<String> {
        let i = self.0.iter().position(|(n, _)| n == name)?;
        Some(self.0.swap_remove(i).1)
    }

    fn flag(&mut self, name: &str) -> bool {
        self.take(name)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }
}

/// `LWS auth-param *(COMMA auth-param)`; empty list elements are tolerated
/// (RFC 7230 §7).
fn params(cur: &mut Cursor<'_>) -> Result<Params, AuthError> {
    let mut out: Vec<(String, String)> = Vec::new();
    match cur.peek() {
        None => return Ok(Params(out)),
        Some(c) if is_lws(c) => {}
        Some(_) => return Err(cur.syntax("whitespace after scheme")),
    }
    loop {
        cur.skip_lws();
        while cur.peek() == Some(',') {
            cur.bump(',');
            cur.skip_lws();
        }
        if cur.peek().is_none() {
            break;
        }
        let name = cur
            .token()
            .ok_or(cur.syntax("auth-param name"))?
            .to_ascii_lowercase();
        cur.skip_lws();
        if cur.peek() != Some('=') {
            return Err(cur.syntax("'='"));
        }
        cur.bump('=');
        cur.skip_lws();
        let value = if cur.peek() == Some('"') {
            cur.quoted()?
        } else {
            let v = cur.take_while(is_bare_value_char);
            if v.is_empty() {
                return Err(cur.syntax("auth-param value"));
            }
            v.to_owned()
        };
        if out.iter().any(|(n, _)| *n == name) {
            return Err(AuthError::DuplicateParam(name));
        }
        if out.len() >= MAX_PARAMS {
            return Err(AuthError::TooManyParams);
        }
        out.push((name, value));
        cur.skip_lws();
        match cur.peek() {
            None => break,
            Some(',') => {}
            Some(_) => return Err(cur.syntax("','")),
        }
    }
    Ok(Params(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef-cluster-secret";
    const REALM: &str = "sipzone.local";
    const T0: u64 = 1_700_000_000;
    const MAX_AGE: u64 = 300;

    fn verifier() -> Verifier {
        let key = NonceKey::new(SECRET).unwrap();
        Verifier::new(key, REALM, MAX_AGE, NcTracker::new(1024))
    }

    fn digest(value: &str) -> DigestCredentials {
        match Credentials::parse(value).unwrap() {
            Credentials::Digest(c) => c,
            other => panic!("not digest: {other:?}"),
        }
    }

    /// Answers `challenge` as alice with `password` and parses the result
    /// back, the way a server sees it.
    fn answer(challenge: &Challenge, password: &str, nc: u32) -> DigestCredentials {
        let header = Challenge::parse(&challenge.to_header_value()).unwrap();
        let value = respond(
            &header,
            "REGISTER",
            "sip:sipzone.local",
            "alice",
            password,
            "c0ffee",
            nc,
        )
        .unwrap();
        digest(&value)
    }

    fn alice_ha1(alg: Algorithm) -> String {
        ha1(alg, "alice", REALM, "secret")
    }

    // -- RFC vectors --------------------------------------------------------

    const RFC7616_NONCE: &str = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v";
    const RFC7616_CNONCE: &str = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ";

    fn rfc7616_response(alg: Algorithm) -> String {
        let h1 = ha1(alg, "Mufasa", "http-auth@example.org", "Circle of Life");
        let h2 = ha2(alg, "GET", "/dir/index.html");
        let q = QopAuth {
            nc: "00000001",
            cnonce: RFC7616_CNONCE,
        };
        response(alg, &h1, RFC7616_NONCE, Some(q), &h2)
    }

    #[test]
    fn rfc7616_md5_vector() {
        assert_eq!(
            rfc7616_response(Algorithm::Md5),
            "8ca523f5e9506fed4657c9700eebdbec"
        );
    }

    #[test]
    fn rfc7616_sha256_vector() {
        assert_eq!(
            rfc7616_response(Algorithm::Sha256),
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
        );
    }

    #[test]
    fn rfc2617_vector() {
        let alg = Algorithm::Md5;
        let h1 = ha1(alg, "Mufasa", "testrealm@host.com", "Circle Of Life");
        let h2 = ha2(alg, "GET", "/dir/index.html");
        let q = QopAuth {
            nc: "00000001",
            cnonce: "0a4f113b",
        };
        assert_eq!(
            response(alg, &h1, "dcd98b7102dd2f0e8b11d0f600bfb0c093", Some(q), &h2),
            "6629fae49393a05397450978507c4ef1"
        );
    }

    #[test]
    fn rfc2617_vector_through_parser() {
        // The Authorization header of RFC 2617 §3.5, folded lines included.
        let value = "Digest username=\"Mufasa\",\r\n realm=\"testrealm@host.com\",\r\n \
            nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\",\r\n uri=\"/dir/index.html\",\r\n \
            qop=auth,\r\n nc=00000001,\r\n cnonce=\"0a4f113b\",\r\n \
            response=\"6629fae49393a05397450978507c4ef1\",\r\n \
            opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"";
        let c = digest(value);
        assert_eq!(c.username, "Mufasa");
        assert_eq!(c.nc_value(), Some(1));
        assert_eq!(
            c.opaque.as_deref(),
            Some("5ccc069c403ebaf9f0171e9517f40e41")
        );
        let h1 = ha1(
            Algorithm::Md5,
            "Mufasa",
            "testrealm@host.com",
            "Circle Of Life",
        );
        let q = QopAuth {
            nc: c.nc.as_deref().unwrap(),
            cnonce: c.cnonce.as_deref().unwrap(),
        };
        let expected = response(
            c.algorithm,
            &h1,
            &c.nonce,
            Some(q),
            &ha2(c.algorithm, "GET", &c.uri),
        );
        assert!(ct_eq_hex(&expected, &c.response));
    }

    #[test]
    fn no_qop_and_sess_vectors() {
        // Independently computed with Python hashlib.
        let alg = Algorithm::Md5;
        let h1 = ha1(alg, "Mufasa", "testrealm@host.com", "Circle Of Life");
        let h2 = ha2(alg, "GET", "/dir/index.html");
        assert_eq!(
            response(alg, &h1, "dcd98b7102dd2f0e8b11d0f600bfb0c093", None, &h2),
            NO_QOP_MD5
        );
        let s = session_ha1(
            Algorithm::Md5Sess,
            &h1,
            "dcd98b7102dd2f0e8b11d0f600bfb0c093",
            "0a4f113b",
        );
        assert_eq!(s, SESS_HA1_MD5);
        assert_eq!(session_ha1(Algorithm::Md5, &h1, "n", "c"), h1);
        assert_eq!(
            userhash(Algorithm::Sha256, "Mufasa", "http-auth@example.org"),
            USERHASH_SHA256
        );
    }

    const NO_QOP_MD5: &str = "670fd8c2df070c60b045671b8b24ff02";
    const SESS_HA1_MD5: &str = "5edb191b66dce1584c16cb7e7346fcee";
    const USERHASH_SHA256: &str =
        "a947aad205e80e429958a387394944c6b496301e79f89d35a4cc23b6ee12b5b6";

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq_hex("abcdef", "abcdef"));
        assert!(ct_eq_hex("abcdef", "ABCDEF"));
        assert!(!ct_eq_hex("abcdef", "abcdee"));
        assert!(!ct_eq_hex("abcdef", "abcde"));
        assert!(!ct_eq_hex("", "a"));
    }

    // -- Round trips --------------------------------------------------------

    #[test]
    fn round_trip_both_algorithms() {
        let mut v = verifier();
        let challenges = v.challenges(T0, [1; 8], false);
        assert_eq!(challenges.len(), 2);
        // The pair shares one nonce (and so one nc window): a client answers
        // one of them, so the second answer here continues the count.
        assert_eq!(challenges[0].nonce, challenges[1].nonce);
        let algs = [Algorithm::Sha256, Algorithm::Md5];
        for ((c, alg), nc) in challenges.iter().zip(algs).zip(1..) {
            assert_eq!(c.algorithm, alg);
            let creds = answer(c, "secret", nc);
            assert_eq!(creds.algorithm, alg);
            let ok = v
                .verify(T0 + 5, "REGISTER", &creds, &alice_ha1(alg))
                .unwrap();
            assert_eq!(
                ok,
                Verified {
                    algorithm: alg,
                    issued_at: T0,
                    nc: Some(nc)
                }
            );
        }
    }

    #[test]
    fn round_trip_sess_and_userhash() {
        let mut v = verifier();
        for (alg, r) in [(Algorithm::Md5Sess, 1), (Algorithm::Sha256Sess, 2)] {
            let mut c = v.challenge(T0, [r; 8], false, alg);
            c.userhash = true;
            let creds = answer(&c, "secret", 1);
            assert!(creds.userhash);
            assert_eq!(creds.username, userhash(alg, "alice", REALM));
            assert_eq!(creds.username.len(), alg.hex_len());
            let ok = v.verify(T0, "REGISTER", &creds, &alice_ha1(alg)).unwrap();
            assert_eq!(ok.algorithm, alg);
        }
    }

    #[test]
    fn challenge_header_format() {
        let v = verifier();
        let c = v.challenges(T0, [0; 8], false);
        let nonce = &c[0].nonce;
        assert_eq!(nonce.len(), 64);
        assert_eq!(
            c[0].to_header_value(),
            format!(
                "Digest realm=\"sipzone.local\", nonce=\"{nonce}\", algorithm=SHA-256, qop=\"auth\""
            )
        );
        assert_eq!(
            c[1].to_header_value(),
            format!(
                "Digest realm=\"sipzone.local\", nonce=\"{nonce}\", algorithm=MD5, qop=\"auth\""
            )
        );
        let stale = v.challenge(T0, [0; 8], true, Algorithm::Md5);
        assert!(stale.to_header_value().ends_with(", stale=true"));
        assert_eq!(Challenge::parse(&stale.to_header_value()).unwrap(), stale);
    }

    #[test]
    fn credentials_header_round_trip() {
        let v = verifier();
        let mut c = v.challenge(T0, [3; 8], false, Algorithm::Sha256);
        c.opaque = Some("op\"aque".into());
        let creds =
            respond_credentials(&c, "INVITE", "sip:bob@x", "al\\ice", "pw", "cn", 0x1a).unwrap();
        assert_eq!(creds.nc.as_deref(), Some("0000001a"));
        let value = creds.to_header_value();
        assert!(value.contains("qop=auth, nc=0000001a"));
        assert_eq!(digest(&value), creds);
    }

    // -- Verifier rejections ------------------------------------------------

    #[test]
    fn wrong_password_rejected() {
        let mut v = verifier();
        for alg in [Algorithm::Sha256, Algorithm::Md5] {
            let c = v.challenge(T0, [4; 8], false, alg);
            let creds = answer(&c, "guess", 1);
            assert_eq!(
                v.verify(T0, "REGISTER", &creds, &alice_ha1(alg)),
                Err(Rejection::BadResponse)
            );
        }
    }

    #[test]
    fn wrong_method_or_tampered_field_rejected() {
        let mut v = verifier();
        let c = v.challenge(T0, [4; 8], false, Algorithm::Sha256);
        let creds = answer(&c, "secret", 1);
        let ha1 = alice_ha1(Algorithm::Sha256);
        assert_eq!(
            v.verify(T0, "INVITE", &creds, &ha1),
            Err(Rejection::BadResponse)
        );
        let mut other_uri = creds.clone();
        other_uri.uri = "sip:evil".into();
        assert_eq!(
            v.verify(T0, "REGISTER", &other_uri, &ha1),
            Err(Rejection::BadResponse)
        );
        let mut other_cnonce = creds.clone();
        other_cnonce.cnonce = Some("x".into());
        assert_eq!(
            v.verify(T0, "REGISTER", &other_cnonce, &ha1),
            Err(Rejection::BadResponse)
        );
        let mut upper = creds.clone();
        upper.response = upper.response.to_ascii_uppercase();
        assert!(v.verify(T0, "REGISTER", &upper, &ha1).is_ok());
    }

    #[test]
    fn failed_verify_leaves_tracker_untouched() {
        let mut v = verifier();
        let c = v.challenge(T0, [5; 8], false, Algorithm::Md5);
        let bad = answer(&c, "guess", 1);
        assert_eq!(
            v.verify(T0, "REGISTER", &bad, &alice_ha1(Algorithm::Md5)),
            Err(Rejection::BadResponse)
        );
        assert!(v.tracker().is_empty());
        let good = answer(&c, "secret", 1);
        assert!(
            v.verify(T0, "REGISTER", &good, &alice_ha1(Algorithm::Md5))
                .is_ok()
        );
        assert_eq!(v.tracker().len(), 1);
    }

    #[test]
    fn altered_nonce_invalid() {
        let key = NonceKey::new(SECRET).unwrap();
        let nonce = key.issue(T0, [9; 8]);
        assert_eq!(
            key.check(&nonce, T0, MAX_AGE),
            NonceStatus::Valid { issued_at: T0 }
        );
        // Flip every hex digit in turn: timestamp, random and MAC all covered.
        for i in 0..nonce.len() {
            let mut b = nonce.clone().into_bytes();
            b[i] = if b[i] == b'0' { b'1' } else { b'0' };
            let altered = String::from_utf8(b).unwrap();
            assert_eq!(
                key.check(&altered, T0, MAX_AGE),
                NonceStatus::Invalid,
                "digit {i}"
            );
        }
        for junk in [
            "",
            "zz",
            &nonce[..63],
            &format!("{nonce}0"),
            &nonce.replace('a', "g"),
        ] {
            if junk != nonce {
                assert_eq!(key.check(junk, T0, MAX_AGE), NonceStatus::Invalid);
            }
        }
        // Upper-case hex decodes to the same bytes: still genuine.
        assert_eq!(
            key.check(&nonce.to_ascii_uppercase(), T0, MAX_AGE),
            NonceStatus::Valid { issued_at: T0 }
        );

        let mut v = verifier();
        let c = v.challenge(T0, [9; 8], false, Algorithm::Md5);
        let mut creds = answer(&c, "secret", 1);
        creds.nonce = creds.nonce.replacen(&creds.nonce[..1], "f", 1);
        assert_eq!(
            v.verify(T0, "REGISTER", &creds, &alice_ha1(Algorithm::Md5)),
            Err(Rejection::BadNonce)
        );
    }

    #[test]
    fn nonce_from_other_secret_invalid_same_secret_valid() {
        let a = NonceKey::new(SECRET).unwrap();
        let b = NonceKey::new(SECRET).unwrap();
        let other = NonceKey::new(b"another-secret-of-enough-length").unwrap();
        let nonce = a.issue(T0, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            b.check(&nonce, T0 + 1, MAX_AGE),
            NonceStatus::Valid { issued_at: T0 }
        );
        assert_eq!(other.check(&nonce, T0 + 1, MAX_AGE), NonceStatus::Invalid);
        assert_ne!(nonce, a.issue(T0, [0; 8]));
    }

    #[test]
    fn expired_nonce_stale() {
        let key = NonceKey::new(SECRET).unwrap();
        let nonce = key.issue(T0, [0; 8]);
        assert_eq!(
            key.check(&nonce, T0 + MAX_AGE, MAX_AGE),
            NonceStatus::Valid { issued_at: T0 }
        );
        assert_eq!(
            key.check(&nonce, T0 + MAX_AGE + 1, MAX_AGE),
            NonceStatus::Stale { issued_at: T0 }
        );

        let mut v = verifier();
        let c = v.challenge(T0, [0; 8], false, Algorithm::Sha256);
        let ha1 = alice_ha1(Algorithm::Sha256);
        let late = T0 + MAX_AGE + 1;
        let good = answer(&c, "secret", 1);
        let err = v.verify(late, "REGISTER", &good, &ha1).unwrap_err();
        assert_eq!(err, Rejection::Stale);
        assert!(err.is_stale());
        // Stale is only said when the digest is right (RFC 7616 §3.3).
        let bad = answer(&c, "guess", 1);
        assert_eq!(
            v.verify(late, "REGISTER", &bad, &ha1),
            Err(Rejection::BadResponse)
        );
        assert!(v.tracker().is_empty());
    }

    #[test]
    fn future_nonce_invalid_beyond_skew() {
        let key = NonceKey::new(SECRET).unwrap();
        let near = key.issue(T0 + NONCE_CLOCK_SKEW_SECS, [0; 8]);
        assert_eq!(
            key.check(&near, T0, MAX_AGE),
            NonceStatus::Valid {
                issued_at: T0 + NONCE_CLOCK_SKEW_SECS
            }
        );
        let far = key.issue(T0 + NONCE_CLOCK_SKEW_SECS + 1, [0; 8]);
        assert_eq!(key.check(&far, T0, MAX_AGE), NonceStatus::Invalid);
        // Extremes do not overflow.
        let max = key.issue(u64::MAX, [0; 8]);
        assert_eq!(
            key.check(&max, u64::MAX, MAX_AGE),
            NonceStatus::Valid {
                issued_at: u64::MAX
            }
        );
        assert_eq!(key.check(&max, 0, MAX_AGE), NonceStatus::Invalid);
        let zero = key.issue(0, [0; 8]);
        assert_eq!(
            key.check(&zero, u64::MAX, MAX_AGE),
            NonceStatus::Stale { issued_at: 0 }
        );
    }

    #[test]
    fn replay_same_nc_rejected() {
        let mut v = verifier();
        let c = v.challenge(T0, [6; 8], false, Algorithm::Sha256);
        let ha1 = alice_ha1(Algorithm::Sha256);
        let first = answer(&c, "secret", 1);
        assert!(v.verify(T0, "REGISTER", &first, &ha1).is_ok());
        assert_eq!(
            v.verify(T0 + 1, "REGISTER", &first, &ha1),
            Err(Rejection::Replay(NcError::Repeated))
        );
        let second = answer(&c, "secret", 2);
        assert!(v.verify(T0 + 1, "REGISTER", &second, &ha1).is_ok());
    }

    #[test]
    fn out_of_order_nc_within_window_accepted() {
        let mut v = verifier();
        let c = v.challenge(T0, [7; 8], false, Algorithm::Md5);
        let ha1 = alice_ha1(Algorithm::Md5);
        for nc in [5, 3, 4, 1, 2, 68] {
            let creds = answer(&c, "secret", nc);
            assert_eq!(v.verify(T0, "REGISTER", &creds, &ha1).unwrap().nc, Some(nc));
        }
        // 68 - 64 = 4 is now outside the window; 5 is inside but used.
        assert_eq!(
            v.verify(T0, "REGISTER", &answer(&c, "secret", 4), &ha1),
            Err(Rejection::Replay(NcError::BelowWindow))
        );
        assert_eq!(
            v.verify(T0, "REGISTER", &answer(&c, "secret", 5), &ha1),
            Err(Rejection::Replay(NcError::Repeated))
        );
        assert!(
            v.verify(T0, "REGISTER", &answer(&c, "secret", 6), &ha1)
                .is_ok()
        );
    }

    #[test]
    fn nc_window_rules() {
        let mut w = NcWindow::new();
        assert_eq!(w.accept(0), Err(NcError::Zero));
        assert_eq!(w, NcWindow::new());
        assert_eq!(w.accept(100), Ok(()));
        assert_eq!(w.accept(100), Err(NcError::Repeated));
        assert_eq!(w.accept(37), Ok(())); // 100 - 63, the window's low edge
        assert_eq!(w.accept(36), Err(NcError::BelowWindow));
        assert_eq!(w.accept(1), Err(NcError::BelowWindow));
        assert_eq!(w.accept(101), Ok(()));
        assert_eq!(w.accept(37), Err(NcError::BelowWindow)); // slid out
        assert_eq!(w.accept(38), Ok(()));
        // A jump wider than the window clears the bitmap.
        assert_eq!(w.accept(1000), Ok(()));
        assert_eq!(w.accept(999), Ok(()));
        assert_eq!(w.accept(1000), Err(NcError::Repeated));
        assert_eq!(w.accept(u32::MAX), Ok(()));
        assert_eq!(w.accept(u32::MAX), Err(NcError::Repeated));
        assert_eq!(w.highest(), u32::MAX);
        let before = w;
        assert_eq!(w.accept(u32::MAX - 64), Err(NcError::BelowWindow));
        assert_eq!(w, before);
    }

    #[test]
    fn tracker_bounded_and_eviction_never_reopens_replay() {
        let mut t = NcTracker::new(2);
        assert_eq!(t.record("a", 10, 1), Ok(()));
        assert_eq!(t.record("b", 11, 1), Ok(()));
        assert_eq!(t.record("c", 12, 1), Ok(()));
        assert_eq!(t.len(), 2);
        // "a" was evicted: its nc=1 replay is refused, not accepted afresh.
        assert_eq!(t.record("a", 10, 1), Err(NcError::Forgotten));
        // A new nonce older than everything tracked is refused, state kept.
        assert_eq!(t.record("z", 5, 1), Err(NcError::Forgotten));
        assert_eq!(t.len(), 2);
        assert_eq!(t.record("b", 11, 1), Err(NcError::Repeated));
        assert_eq!(t.record("c", 12, 2), Ok(()));
        // A refused first count creates no entry.
        assert_eq!(t.record("d", 13, 0), Err(NcError::Zero));
        assert_eq!(t.record("b", 11, 2), Ok(()));
        t.purge_expired(12);
        assert_eq!(t.len(), 1);
        assert_eq!(t.record("c", 12, 2), Err(NcError::Repeated));
        t.raise_floor(20);
        assert_eq!(t.record("e", 19, 1), Err(NcError::Forgotten));
        assert_eq!(t.record("e", 20, 1), Ok(()));
        assert_eq!(NcTracker::new(0).capacity(), 1);
    }

    #[test]
    fn tracker_eviction_gives_stale_through_verifier() {
        let key = NonceKey::new(SECRET).unwrap();
        let mut v = Verifier::new(key, REALM, MAX_AGE, NcTracker::new(1));
        let ha1 = alice_ha1(Algorithm::Md5);
        let old = v.challenge(T0, [1; 8], false, Algorithm::Md5);
        let new = v.challenge(T0 + 1, [2; 8], false, Algorithm::Md5);
        let old1 = answer(&old, "secret", 1);
        assert!(v.verify(T0 + 1, "REGISTER", &old1, &ha1).is_ok());
        assert!(
            v.verify(T0 + 1, "REGISTER", &answer(&new, "secret", 1), &ha1)
                .is_ok()
        );
        assert_eq!(v.tracker().len(), 1);
        assert_eq!(
            v.verify(T0 + 2, "REGISTER", &old1, &ha1),
            Err(Rejection::Stale)
        );
    }

    #[test]
    fn verifier_purges_expired_windows() {
        let mut v = verifier();
        let ha1 = alice_ha1(Algorithm::Md5);
        for i in 0..10u8 {
            let c = v.challenge(T0 + u64::from(i), [i; 8], false, Algorithm::Md5);
            let creds = answer(&c, "secret", 1);
            assert!(
                v.verify(T0 + u64::from(i), "REGISTER", &creds, &ha1)
                    .is_ok()
            );
        }
        assert_eq!(v.tracker().len(), 10);
        let c = v.challenge(T0 + MAX_AGE + 5, [99; 8], false, Algorithm::Md5);
        let creds = answer(&c, "secret", 1);
        assert!(v.verify(T0 + MAX_AGE + 5, "REGISTER", &creds, &ha1).is_ok());
        // Nonces issued before T0 + 5 expired and were dropped.
        assert_eq!(v.tracker().len(), 6);
    }

    #[test]
    fn realm_mismatch_and_bad_stored_ha1() {
        let mut v = verifier();
        let c = v.challenge(T0, [8; 8], false, Algorithm::Sha256);
        let creds = answer(&c, "secret", 1);
        let mut other = creds.clone();
        other.realm = "elsewhere".into();
        let ha1 = alice_ha1(Algorithm::Sha256);
        assert_eq!(
            v.verify(T0, "REGISTER", &other, &ha1),
            Err(Rejection::RealmMismatch)
        );
        let md5_ha1 = alice_ha1(Algorithm::Md5);
        assert_eq!(
            v.verify(T0, "REGISTER", &creds, &md5_ha1),
            Err(Rejection::StoredHa1Mismatch)
        );
        let not_hex = "g".repeat(64);
        assert_eq!(
            v.verify(T0, "REGISTER", &creds, &not_hex),
            Err(Rejection::StoredHa1Mismatch)
        );
        assert!(
            v.verify(T0, "REGISTER", &creds, &ha1.to_ascii_uppercase())
                .is_ok()
        );
    }

    #[test]
    fn rfc2069_mode_only_when_allowed() {
        let mut v = verifier();
        let mut c = v.challenge(T0, [3; 8], false, Algorithm::Md5);
        c.qop.clear();
        let creds = answer(&c, "secret", 1);
        assert_eq!(creds.qop, None);
        assert_eq!(creds.nc, None);
        assert!(!creds.to_header_value().contains("nc="));
        let ha1 = alice_ha1(Algorithm::Md5);
        assert_eq!(
            v.verify(T0, "REGISTER", &creds, &ha1),
            Err(Rejection::QopRequired)
        );
        let mut v = v.danger_allow_rfc2069(true);
        assert_eq!(v.verify(T0, "REGISTER", &creds, &ha1).unwrap().nc, None);
        assert!(v.tracker().is_empty());
    }

    #[test]
    fn bad_nonce_count_in_struct_rejected() {
        let mut v = verifier();
        let c = v.challenge(T0, [3; 8], false, Algorithm::Md5);
        let mut creds = answer(&c, "secret", 1);
        creds.nc = Some("1".into());
        let ha1 = alice_ha1(Algorithm::Md5);
        assert_eq!(
            v.verify(T0, "REGISTER", &creds, &ha1),
            Err(Rejection::BadNonceCount)
        );
        creds.nc = None;
        assert_eq!(
            v.verify(T0, "REGISTER", &creds, &ha1),
            Err(Rejection::BadNonceCount)
        );
    }

    #[test]
    fn client_refuses_unusable_challenges() {
        let v = verifier();
        let mut c = v.challenge(T0, [0; 8], false, Algorithm::Md5);
        c.qop = vec![Qop::AuthInt];
        assert_eq!(
            respond(&c, "REGISTER", "sip:x", "u", "p", "c", 1),
            Err(AuthError::NoUsableQop)
        );
        c.qop = vec![Qop::AuthInt, Qop::Auth];
        assert!(respond(&c, "REGISTER", "sip:x", "u", "p", "c", 1).is_ok());
        c.qop.clear();
        c.algorithm = Algorithm::Sha256Sess;
        assert_eq!(
            respond(&c, "REGISTER", "sip:x", "u", "p", "c", 1),
            Err(AuthError::NoUsableQop)
        );
    }

    #[test]
    fn weak_secret_rejected_and_debug_redacts() {
        assert_eq!(
            NonceKey::new(b"short").unwrap_err(),
            AuthError::WeakSecret { len: 5 }
        );
        let key = NonceKey::new(SECRET).unwrap();
        assert!(!format!("{key:?}").contains("0123"));
        let v = verifier();
        let creds = answer(&v.challenge(T0, [0; 8], false, Algorithm::Md5), "secret", 1);
        let dbg = format!("{creds:?}");
        assert!(!dbg.contains(&creds.response));
        assert!(dbg.contains("<redacted>"));
    }

    // -- Parsing ------------------------------------------------------------

    #[test]
    fn unknown_scheme_is_not_an_error() {
        assert_eq!(
            Credentials::parse("NoOneKnowsThisScheme opaque-data=here"),
            Ok(Credentials::Other {
                scheme: "NoOneKnowsThisScheme".into()
            })
        );
        assert_eq!(
            Credentials::parse("Bearer abc.def-ghi=="),
            Ok(Credentials::Other {
                scheme: "Bearer".into()
            })
        );
        assert_eq!(
            Challenge::parse("Basic realm=\"x\""),
            Err(AuthError::UnsupportedScheme("Basic".into()))
        );
    }

    #[test]
    fn quoted_string_escapes() {
        let c = digest(
            r#"Digest username="Mu\"fa\\sa", realm="a,b=c \"d\"", nonce="n", uri="sip:x", response="r", opaque="\q""#,
        );
        assert_eq!(c.username, "Mu\"fa\\sa");
        assert_eq!(c.realm, "a,b=c \"d\"");
        assert_eq!(c.opaque.as_deref(), Some("q"));
        assert_eq!(digest(&c.to_header_value()), c);
        // Non-ASCII inside quotes and escaped.
        let u = digest(
            "Digest username=\"Jürgen\\é\", realm=\"r\", nonce=\"n\", uri=\"u\", response=\"x\"",
        );
        assert_eq!(u.username, "Jürgené");
        // Control characters never reach the output line.
        assert_eq!(quote("a\r\nb\tc"), "\"ab\tc\"");
    }

    #[test]
    fn tolerant_whitespace_and_case() {
        let canonical = digest(
            "Digest username=\"alice\", realm=\"r\", nonce=\"n\", uri=\"sip:r\", response=\"abc\", algorithm=SHA-256, qop=auth, nc=00000001, cnonce=\"c\"",
        );
        for v in [
            "Digest username=\"alice\",realm=\"r\",nonce=\"n\",uri=\"sip:r\",response=\"abc\",algorithm=SHA-256,qop=auth,nc=00000001,cnonce=\"c\"",
            "  DIGEST\tUserName = \"alice\" ,  REALM=\"r\" ,\tnonce =\"n\",uri= \"sip:r\" , response=\"abc\" , Algorithm = sha-256 , QOP=AUTH , NC=00000001 , CNonce=\"c\"  ",
            "digest username=alice, realm=r, nonce=n, uri=sip:r, response=abc, algorithm=\"SHA-256\", qop=\"auth\", nc=\"00000001\", cnonce=c",
            "Digest  ,username=\"alice\",, realm=\"r\", nonce=\"n\",\r\n uri=\"sip:r\", response=\"abc\", algorithm=SHA-256, qop=auth, nc=00000001, cnonce=\"c\",",
        ] {
            assert_eq!(digest(v), canonical, "{v}");
        }
        // Unknown directives are ignored.
        let extra = digest(
            "Digest username=\"alice\", realm=\"r\", nonce=\"n\", uri=\"sip:r\", response=\"abc\", algorithm=SHA-256, qop=auth, nc=00000001, cnonce=\"c\", foo=bar, x=\"y\"",
        );
        assert_eq!(extra, canonical);
        let unquoted_uri =
            digest("Digest username=a, realm=r, nonce=n, uri=sip:a@b;transport=udp, response=x");
        assert_eq!(unquoted_uri.uri, "sip:a@b;transport=udp");
        assert_eq!(unquoted_uri.algorithm, Algorithm::Md5);
    }

    #[test]
    fn challenge_parsing() {
        let c = Challenge::parse(
            "digest REALM=\"atlanta.com\", domain=\"sip:ss1.carrier.com\", qop=\"auth, auth-int ,token\", nonce=\"f84f1cec41e6cbe5aea9c8e88d359\", opaque=\"\", stale=TRUE, algorithm=md5-sess",
        )
        .unwrap();
        assert_eq!(c.realm, "atlanta.com");
        assert_eq!(c.nonce, "f84f1cec41e6cbe5aea9c8e88d359");
        assert_eq!(c.opaque.as_deref(), Some(""));
        assert_eq!(c.qop, vec![Qop::Auth, Qop::AuthInt]);
        assert!(c.stale);
        assert!(!c.userhash);
        assert_eq!(c.algorithm, Algorithm::Md5Sess);
        let bare = Challenge::parse("Digest realm=r, nonce=n").unwrap();
        assert_eq!(bare.algorithm, Algorithm::Md5);
        assert!(bare.qop.is_empty());
        assert!(!bare.stale);
        assert_eq!(
            Challenge::parse("Digest nonce=n"),
            Err(AuthError::MissingParam("realm"))
        );
        assert_eq!(
            Challenge::parse("Digest realm=r"),
            Err(AuthError::MissingParam("nonce"))
        );
        assert_eq!(
            Challenge::parse("Digest realm=r, nonce=n, algorithm=SHA-512-256"),
            Err(AuthError::UnsupportedAlgorithm("SHA-512-256".into()))
        );
    }

    #[test]
    fn algorithm_tokens() {
        for a in [
            Algorithm::Md5,
            Algorithm::Md5Sess,
            Algorithm::Sha256,
            Algorithm::Sha256Sess,
        ] {
            assert_eq!(a.as_str().parse::<Algorithm>(), Ok(a));
            assert_eq!(
                a.to_string().to_ascii_lowercase().parse::<Algorithm>(),
                Ok(a)
            );
        }
        assert!("SHA256".parse::<Algorithm>().is_err());
    }

    #[test]
    fn malformed_inputs_are_errors() {
        let base = "username=\"a\", realm=\"r\", nonce=\"n\", uri=\"u\", response=\"x\"";
        let cases: Vec<(String, AuthError)> = vec![
            (
                "".into(),
                AuthError::Syntax {
                    pos: 0,
                    expected: "auth scheme",
                },
            ),
            (
                "   ".into(),
                AuthError::Syntax {
                    pos: 3,
                    expected: "auth scheme",
                },
            ),
            (
                "\"Digest\"".into(),
                AuthError::Syntax {
                    pos: 0,
                    expected: "auth scheme",
                },
            ),
            ("Digest".into(), AuthError::MissingParam("username")),
            (
                "Digest,username=a".into(),
                AuthError::Syntax {
                    pos: 6,
                    expected: "whitespace after scheme",
                },
            ),
            (
                "Digest username=\"abc".into(),
                AuthError::UnterminatedQuote { pos: 16 },
            ),
            (
                "Digest username=\"abc\\".into(),
                AuthError::UnterminatedQuote { pos: 16 },
            ),
            (
                "Digest username".into(),
                AuthError::Syntax {
                    pos: 15,
                    expected: "'='",
                },
            ),
            (
                "Digest =abc".into(),
                AuthError::Syntax {
                    pos: 7,
                    expected: "auth-param name",
                },
            ),
            (
                "Digest username=".into(),
                AuthError::Syntax {
                    pos: 16,
                    expected: "auth-param value",
                },
            ),
            (
                "Digest username=,".into(),
                AuthError::Syntax {
                    pos: 16,
                    expected: "auth-param value",
                },
            ),
            (
                "Digest username=\"a\" realm=\"r\"".into(),
                AuthError::Syntax {
                    pos: 20,
                    expected: "','",
                },
            ),
            (
                "Digest username=a b".into(),
                AuthError::Syntax {
                    pos: 18,
                    expected: "','",
                },
            ),
            (
                format!("Digest {base}, USERNAME=\"b\""),
                AuthError::DuplicateParam("username".into()),
            ),
            (
                "Digest realm=\"r\", nonce=\"n\", uri=\"u\", response=\"x\"".into(),
                AuthError::MissingParam("username"),
            ),
            (
                "Digest username=\"a\", nonce=\"n\", uri=\"u\", response=\"x\"".into(),
                AuthError::MissingParam("realm"),
            ),
            (
                "Digest username=\"a\", realm=\"r\", uri=\"u\", response=\"x\"".into(),
                AuthError::MissingParam("nonce"),
            ),
            (
                "Digest username=\"a\", realm=\"r\", nonce=\"n\", response=\"x\"".into(),
                AuthError::MissingParam("uri"),
            ),
            (
                "Digest username=\"a\", realm=\"r\", nonce=\"n\", uri=\"u\"".into(),
                AuthError::MissingParam("response"),
            ),
            (
                format!("Digest {base}, qop=auth, nc=00000001"),
                AuthError::MissingParam("cnonce"),
            ),
            (
                format!("Digest {base}, qop=auth, cnonce=\"c\""),
                AuthError::MissingParam("nc"),
            ),
            (
                format!("Digest {base}, qop=auth, cnonce=\"c\", nc=1"),
                AuthError::InvalidNonceCount("1".into()),
            ),
            (
                format!("Digest {base}, qop=auth, cnonce=\"c\", nc=0000000g"),
                AuthError::InvalidNonceCount("0000000g".into()),
            ),
            (
                format!("Digest {base}, qop=auth, cnonce=\"c\", nc=+0000001"),
                AuthError::InvalidNonceCount("+0000001".into()),
            ),
            (
                format!("Digest {base}, qop=auth-int, cnonce=\"c\", nc=00000001"),
                AuthError::UnsupportedQop("auth-int".into()),
            ),
            (
                format!("Digest {base}, qop=bogus"),
                AuthError::UnsupportedQop("bogus".into()),
            ),
            (
                format!("Digest {base}, algorithm=SHA-512"),
                AuthError::UnsupportedAlgorithm("SHA-512".into()),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                Credentials::parse(&input),
                Err(expected.clone()),
                "{input:?}"
            );
            assert_eq!(expected.status(), 400);
        }
        let many: Vec<String> = (0..=MAX_PARAMS).map(|i| format!("p{i}=v")).collect();
        assert_eq!(
            Credentials::parse(&format!("Digest {}", many.join(","))),
            Err(AuthError::TooManyParams)
        );
        assert_eq!(AuthError::NoUsableQop.status(), 500);
    }

    #[test]
    fn every_prefix_and_mutation_parses_without_panic() {
        let v = verifier();
        let mut c = v.challenge(T0, [1; 8], true, Algorithm::Sha256);
        c.opaque = Some("o\"p\\q".into());
        c.userhash = true;
        let challenge = c.to_header_value();
        let mut creds =
            respond_credentials(&c, "REGISTER", "sip:ü@x", "bö\"b", "pw", "c", 7).unwrap();
        creds.username = "bö\"b".into();
        let credentials = creds.to_header_value();
        let specials = ['"', '\\', ',', '=', ' ', '\r', '\0', 'é', '€'];
        for value in [challenge.as_str(), credentials.as_str()] {
            for (i, _) in value.char_indices().chain([(value.len(), ' ')]) {
                let prefix = &value[..i];
                let _ = Credentials::parse(prefix);
                let _ = Challenge::parse(prefix);
                for s in specials {
                    let mut m = String::from(prefix);
                    m.push(s);
                    m.push_str(
                        value
                            .get(i..)
                            .and_then(|r| r.get(r.chars().next().map_or(0, char::len_utf8)..))
                            .unwrap_or(""),
                    );
                    let _ = Credentials::parse(&m);
                    let _ = Challenge::parse(&m);
                }
            }
        }
        // The full values parse.
        assert_eq!(Challenge::parse(&challenge).unwrap(), c);
        assert_eq!(digest(&credentials), creds);
    }
}
