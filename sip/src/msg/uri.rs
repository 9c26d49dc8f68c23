//! URIs: `sip:`, `sips:` (RFC 3261 §19.1, §25.1), `tel:` (RFC 3966) and any
//! other `absoluteURI`, parsed from borrowed text.
//!
//! IPv6 references follow RFC 5118: `[2001:db8::10]` is an address and never a
//! port, an unbracketed IPv6 host is an error, and the three-colon form that the
//! RFC 3261 ABNF erroneously allows (`[2001:db8:::192.0.2.1]`, RFC 5118 §4.10)
//! is tolerated.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::scan::{Params, percent_decode};

/// Why a URI did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// No `scheme:` prefix, or a scheme with characters outside RFC 3986 §3.1.
    #[error("missing or invalid URI scheme")]
    Scheme,
    /// The user or password part holds characters not allowed there.
    #[error("invalid user part")]
    User,
    /// The host is empty or not a hostname, IPv4 address or IPv6 reference.
    #[error("invalid host")]
    Host,
    /// The port is not a number in 0..=65535.
    #[error("invalid port")]
    Port,
    /// A URI parameter holds characters not allowed there.
    #[error("invalid URI parameter")]
    Param,
    /// The `?headers` component is malformed.
    #[error("invalid URI headers")]
    Headers,
    /// The URI contains white space or another character never allowed in a URI.
    #[error("invalid character in URI")]
    Char,
}

/// A parsed URI, borrowing its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uri<'a> {
    /// `sip:` or `sips:`.
    Sip(SipUri<'a>),
    /// `tel:` (RFC 3966).
    Tel(TelUri<'a>),
    /// Any other absolute URI, kept opaque.
    Other {
        /// The scheme as written.
        scheme: &'a str,
        /// Everything after `scheme:`.
        rest: &'a str,
    },
}

/// A `sip:` or `sips:` URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SipUri<'a> {
    /// The URI as written.
    pub raw: &'a str,
    /// `sips:`.
    pub secure: bool,
    /// The user part as written (escapes not decoded).
    pub user: Option<&'a str>,
    /// The password part as written.
    pub password: Option<&'a str>,
    /// The host.
    pub host: Host<'a>,
    /// The port, when written.
    pub port: Option<u16>,
    /// The `;uri-parameters`.
    pub params: Params<'a>,
    /// The `?headers` component without the `?`.
    pub headers: Option<&'a str>,
}

/// A `tel:` URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelUri<'a> {
    /// The URI as written.
    pub raw: &'a str,
    /// The number with visual separators, as written.
    pub number: &'a str,
    /// The parameters after the number.
    pub params: Params<'a>,
}

/// The host of a SIP URI or Via.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host<'a> {
    /// A host name, as written.
    Name(&'a str),
    /// An IPv4 address.
    V4(Ipv4Addr),
    /// An IPv6 address (written in brackets).
    V6(Ipv6Addr),
}

impl fmt::Display for Host<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::V4(a) => write!(f, "{a}"),
            Host::V6(a) => write!(f, "[{a}]"),
        }
    }
}

impl Host<'_> {
    /// The IP address, when the host is a literal address.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        match self {
            Host::Name(_) => None,
            Host::V4(a) => Some((*a).into()),
            Host::V6(a) => Some((*a).into()),
        }
    }
}

impl<'a> Uri<'a> {
    /// Parses a URI (no surrounding white space or angle brackets).
    pub fn parse(s: &'a str) -> Result<Self, UriError> {
        if s.bytes()
            .any(|b| b <= b' ' || matches!(b, b'<' | b'>' | b'"' | 0x7f))
        {
            return Err(UriError::Char);
        }
        let (scheme, rest) = s.split_once(':').ok_or(UriError::Scheme)?;
        if !valid_scheme(scheme) {
            return Err(UriError::Scheme);
        }
        if scheme.eq_ignore_ascii_case("sip") || scheme.eq_ignore_ascii_case("sips") {
            let secure = scheme.len() == 4;
            return parse_sip(s, secure, rest).map(Uri::Sip);
        }
        if scheme.eq_ignore_ascii_case("tel") {
            return parse_tel(s, rest).map(Uri::Tel);
        }
        if rest.is_empty() {
            return Err(UriError::Char);
        }
        Ok(Uri::Other { scheme, rest })
    }

    /// The scheme as written.
    pub fn scheme(&self) -> &'a str {
        match self {
            Uri::Sip(u) => &u.raw[..if u.secure { 4 } else { 3 }],
            Uri::Tel(u) => &u.raw[..3],
            Uri::Other { scheme, .. } => scheme,
        }
    }

    /// The SIP URI, when this is one.
    pub fn as_sip(&self) -> Option<&SipUri<'a>> {
        match self {
            Uri::Sip(u) => Some(u),
            _ => None,
        }
    }
}

impl fmt::Display for Uri<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Uri::Sip(u) => f.write_str(u.raw),
            Uri::Tel(u) => f.write_str(u.raw),
            Uri::Other { scheme, rest } => write!(f, "{scheme}:{rest}"),
        }
    }
}

impl<'a> SipUri<'a> {
    /// The user part with `%HH` escapes decoded (may hold any octet).
    pub fn user_decoded(&self) -> Option<Vec<u8>> {
        self.user.map(percent_decode)
    }

    /// The `transport` parameter, lower-cased by the caller if needed.
    pub fn transport(&self) -> Option<&'a str> {
        self.params.get("transport").flatten()
    }

    /// The address-of-record form `sip:user@host` (scheme lower-cased, no
    /// port, parameters or headers), used as a registrar key (RFC 3261 §10.3).
    pub fn aor(&self) -> String {
        let scheme = if self.secure { "sips" } else { "sip" };
        let host = self.host.to_string().to_ascii_lowercase();
        match self.user {
            Some(u) => format!(
                "{scheme}:{}@{host}",
                String::from_utf8_lossy(&percent_decode(u))
            ),
            None => format!("{scheme}:{host}"),
        }
    }
}

fn valid_scheme(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphabetic()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'_' | b'.' | b'!' | b'~' | b'*' | b'\'' | b'(' | b')'
        )
}

/// Checks every octet against `allowed`, accepting `%HH` escapes.
fn chars_ok(s: &str, allowed: impl Fn(u8) -> bool) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if i + 2 >= b.len() {
                return false;
            }
            if !(b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit()) {
                return false;
            }
            i += 3;
            continue;
        }
        if !allowed(b[i]) {
            return false;
        }
        i += 1;
    }
    true
}

fn parse_sip<'a>(raw: &'a str, secure: bool, rest: &'a str) -> Result<SipUri<'a>, UriError> {
    let (userinfo, hostpart) = match rest.find('@') {
        Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
        None => (None, rest),
    };
    let (user, password) = match userinfo {
        None => (None, None),
        Some(ui) => {
            let (u, p) = match ui.find(':') {
                Some(i) => (&ui[..i], Some(&ui[i + 1..])),
                None => (ui, None),
            };
            let user_ok = |b: u8| {
                is_unreserved(b)
                    || matches!(b, b'&' | b'=' | b'+' | b'$' | b',' | b';' | b'?' | b'/')
            };
            if u.is_empty() || !chars_ok(u, user_ok) {
                return Err(UriError::User);
            }
            if let Some(p) = p {
                let pw_ok =
                    |b: u8| is_unreserved(b) || matches!(b, b'&' | b'=' | b'+' | b'$' | b',');
                if !chars_ok(p, pw_ok) {
                    return Err(UriError::User);
                }
            }
            (Some(u), p)
        }
    };
    let (hostport, headers) = match hostpart.find('?') {
        Some(i) => (&hostpart[..i], Some(&hostpart[i + 1..])),
        None => (hostpart, None),
    };
    let (hostport, params, has_params) = match hostport.find(';') {
        Some(i) => (&hostport[..i], &hostport[i + 1..], true),
        None => (hostport, "", false),
    };
    let (host, port) = parse_hostport(hostport)?;
    let param_ok =
        |b: u8| is_unreserved(b) || matches!(b, b'[' | b']' | b'/' | b':' | b'&' | b'+' | b'$');
    // A `;` must be followed by a parameter: `sip:a@b;` and `;;` are refused.
    for p in params.split(';').filter(|_| has_params) {
        let (n, v) = match p.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (p, None),
        };
        if n.is_empty() || !chars_ok(n, param_ok) || v.is_some_and(|v| !chars_ok(v, param_ok)) {
            return Err(UriError::Param);
        }
    }
    if let Some(h) = headers {
        let hnv_ok =
            |b: u8| is_unreserved(b) || matches!(b, b'[' | b']' | b'/' | b'?' | b':' | b'+' | b'$');
        for pair in h.split('&') {
            let (n, v) = pair.split_once('=').ok_or(UriError::Headers)?;
            if n.is_empty() || !chars_ok(n, hnv_ok) || !chars_ok(v, hnv_ok) {
                return Err(UriError::Headers);
            }
        }
    }
    Ok(SipUri {
        raw,
        secure,
        user,
        password,
        host,
        port,
        params: Params::from_raw(params),
        headers,
    })
}

/// Parses `host [":" port]` (RFC 3261 §25.1 `hostport`).
pub fn parse_hostport(s: &str) -> Result<(Host<'_>, Option<u16>), UriError> {
    if let Some(v6) = s.strip_prefix('[') {
        let end = v6.find(']').ok_or(UriError::Host)?;
        let addr = parse_v6(&v6[..end]).ok_or(UriError::Host)?;
        let after = &v6[end + 1..];
        let port = match after {
            "" => None,
            p => Some(parse_port(p.strip_prefix(':').ok_or(UriError::Port)?)?),
        };
        return Ok((Host::V6(addr), port));
    }
    let (h, port) = match s.split_once(':') {
        Some((h, p)) => (h, Some(parse_port(p)?)),
        None => (s, None),
    };
    Ok((parse_host(h)?, port))
}

/// Parses a host without port: hostname, IPv4 or bracketed IPv6.
pub fn parse_host(h: &str) -> Result<Host<'_>, UriError> {
    if let Some(inner) = h.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        return parse_v6(inner).map(Host::V6).ok_or(UriError::Host);
    }
    if h.is_empty() {
        return Err(UriError::Host);
    }
    if h.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return h.parse().map(Host::V4).map_err(|_| UriError::Host);
    }
    let ok = h
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if !ok || h.starts_with('.') || h.starts_with('-') {
        return Err(UriError::Host);
    }
    Ok(Host::Name(h))
}

/// Parses the inside of an IPv6 reference, tolerating the RFC 5118 §4.10
/// three-colon form.
pub fn parse_v6(s: &str) -> Option<Ipv6Addr> {
    if let Ok(a) = s.parse() {
        return Some(a);
    }
    if s.contains(":::") && !s.contains("::::") {
        return s.replacen(":::", "::", 1).parse().ok();
    }
    None
}

fn parse_port(p: &str) -> Result<u16, UriError> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(UriError::Port);
    }
    p.parse().map_err(|_| UriError::Port)
}

fn parse_tel<'a>(raw: &'a str, rest: &'a str) -> Result<TelUri<'a>, UriError> {
    let (number, params) = match rest.find(';') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let digits = number.strip_prefix('+').unwrap_or(number);
    let ok = !digits.is_empty()
        && digits.bytes().all(|b| {
            b.is_ascii_hexdigit()
                || matches!(b, b'-' | b'.' | b'(' | b')' | b'*' | b'#' | b'p' | b'w')
        });
    if !ok {
        return Err(UriError::User);
    }
    Ok(TelUri {
        raw,
        number,
        params: Params::from_raw(params),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sip(s: &str) -> SipUri<'_> {
        match Uri::parse(s).unwrap() {
            Uri::Sip(u) => u,
            other => panic!("not sip: {other:?}"),
        }
    }

    #[test]
    fn sip_uri_parts() {
        let u = sip("sips:alice:pw@Example.COM:5061;transport=tcp;lr?subject=x&h=%20");
        assert!(u.secure);
        assert_eq!(u.user, Some("alice"));
        assert_eq!(u.password, Some("pw"));
        assert_eq!(u.host, Host::Name("Example.COM"));
        assert_eq!(u.port, Some(5061));
        assert_eq!(u.transport(), Some("tcp"));
        assert!(u.params.has("lr"));
        assert_eq!(u.headers, Some("subject=x&h=%20"));
        assert_eq!(u.aor(), "sips:alice@example.com");
    }

    #[test]
    fn user_with_semicolon_and_escapes() {
        let u = sip("sip:user;par=u%40example.net@example.com");
        assert_eq!(u.user, Some("user;par=u%40example.net"));
        assert_eq!(u.host, Host::Name("example.com"));
        let u = sip("sip:%00%00@host5.example.com");
        assert_eq!(u.user_decoded().unwrap(), vec![0, 0]);
    }

    #[test]
    fn ipv6_references() {
        assert_eq!(sip("sip:[2001:db8::10]:5070").port, Some(5070));
        let u = sip("sip:user@[2001:db8::10:5070]");
        assert_eq!(u.port, None);
        assert_eq!(u.host, Host::V6("2001:db8::10:5070".parse().unwrap()));
        assert!(Uri::parse("sip:user@2001:db8::10").is_err());
        assert!(matches!(
            sip("sip:[2001:db8:::192.0.2.1]").host,
            Host::V6(_)
        ));
        assert_eq!(
            sip("sip:[::ffff:192.0.2.1]").host.to_string(),
            "[::ffff:192.0.2.1]"
        );
    }

    #[test]
    fn other_schemes() {
        assert!(
            matches!(Uri::parse("tel:+1-201-555-0123;phone-context=x"), Ok(Uri::Tel(t)) if t.number == "+1-201-555-0123")
        );
        assert!(matches!(
            Uri::parse("NOTSIP:joe@example.com"),
            Ok(Uri::Other {
                scheme: "NOTSIP",
                ..
            })
        ));
        assert!(matches!(
            Uri::parse("soap.beep://192.0.2.103:3002"),
            Ok(Uri::Other { .. })
        ));
        assert!(Uri::parse("SIP:x@y").is_ok());
    }

    #[test]
    fn rejects() {
        for bad in [
            "sip:",
            "sip:user@",
            "sip:a b@c",
            "sip:x@host:99999",
            "sip:x@host:",
            "1sip:x",
            "nocolon",
            "sip:x@h;p=<",
            "sip:x@h?noequals",
            "sip:x@h;",
            "sip:x@h;a;;b",
            "sip:%4@h",
            "tel:",
        ] {
            assert!(Uri::parse(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn every_prefix_is_safe() {
        let s = "sips:u%41:p@[2001:db8::1]:5061;transport=tls;lr?a=b&c=%20";
        for i in 0..=s.len() {
            let _ = Uri::parse(&s[..i]);
        }
    }
}
