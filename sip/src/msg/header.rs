//! Header names (with RFC 3261 §7.3.3 compact forms) and the typed header
//! values the stack needs: Via (§20.42), name-addr headers From/To/Contact/
//! Route/Record-Route/Path (§20.10, §20.20, §20.39, RFC 3327), CSeq (§20.16).

use std::fmt;

use super::Method;
use super::scan::{Params, find_unquoted, is_token, is_token_char, quoted_string, trim_ws};
use super::uri::{Host, Uri, parse_host, parse_hostport};

macro_rules! header_names {
    ($( $(#[$doc:meta])* $var:ident = $name:literal $(, $compact:literal)? ;)*) => {
        /// A header field name. Known names are matched case-insensitively and
        /// in compact form; others keep their text in the header line.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum HeaderName {
            $( $(#[$doc])* $var, )*
            /// Any other header (its name is in the line).
            Other,
        }

        impl HeaderName {
            /// The canonical (long) name.
            pub fn as_str(&self) -> &'static str {
                match self {
                    $( HeaderName::$var => $name, )*
                    HeaderName::Other => "",
                }
            }

            /// Recognises a name as written on the wire, compact forms included.
            pub fn from_wire(name: &str) -> HeaderName {
                $(
                    if name.eq_ignore_ascii_case($name) $( || name.eq_ignore_ascii_case($compact) )? {
                        return HeaderName::$var;
                    }
                )*
                HeaderName::Other
            }
        }
    };
}

header_names! {
    /// `Via`, compact `v`.
    Via = "Via", "v";
    /// `From`, compact `f`.
    From = "From", "f";
    /// `To`, compact `t`.
    To = "To", "t";
    /// `Call-ID`, compact `i`.
    CallId = "Call-ID", "i";
    /// `CSeq`.
    CSeq = "CSeq";
    /// `Contact`, compact `m`.
    Contact = "Contact", "m";
    /// `Max-Forwards`.
    MaxForwards = "Max-Forwards";
    /// `Content-Length`, compact `l`.
    ContentLength = "Content-Length", "l";
    /// `Content-Type`, compact `c`.
    ContentType = "Content-Type", "c";
    /// `Content-Encoding`, compact `e`.
    ContentEncoding = "Content-Encoding", "e";
    /// `Route`.
    Route = "Route";
    /// `Record-Route`.
    RecordRoute = "Record-Route";
    /// `Path` (RFC 3327).
    Path = "Path";
    /// `Require`.
    Require = "Require";
    /// `Proxy-Require`.
    ProxyRequire = "Proxy-Require";
    /// `Supported`, compact `k`.
    Supported = "Supported", "k";
    /// `Unsupported`.
    Unsupported = "Unsupported";
    /// `Allow`.
    Allow = "Allow";
    /// `Accept`.
    Accept = "Accept";
    /// `Expires`.
    Expires = "Expires";
    /// `Min-Expires`.
    MinExpires = "Min-Expires";
    /// `Authorization`.
    Authorization = "Authorization";
    /// `Proxy-Authorization`.
    ProxyAuthorization = "Proxy-Authorization";
    /// `WWW-Authenticate`.
    WwwAuthenticate = "WWW-Authenticate";
    /// `Proxy-Authenticate`.
    ProxyAuthenticate = "Proxy-Authenticate";
    /// `User-Agent`.
    UserAgent = "User-Agent";
    /// `Server`.
    Server = "Server";
    /// `Subject`, compact `s`.
    Subject = "Subject", "s";
    /// `Event`, compact `o`.
    Event = "Event", "o";
    /// `Refer-To`, compact `r`.
    ReferTo = "Refer-To", "r";
    /// `Session-Expires` (RFC 4028), compact `x`.
    SessionExpires = "Session-Expires", "x";
    /// `Min-SE` (RFC 4028).
    MinSe = "Min-SE";
    /// `RSeq` (RFC 3262).
    RSeq = "RSeq";
    /// `RAck` (RFC 3262).
    RAck = "RAck";
    /// `Retry-After`.
    RetryAfter = "Retry-After";
    /// `Warning`.
    Warning = "Warning";
    /// `Date`.
    Date = "Date";
    /// `Timestamp`.
    Timestamp = "Timestamp";
    /// `Reason` (RFC 3326).
    Reason = "Reason";
}

impl HeaderName {
    /// Headers whose value is a comma-separated list (RFC 3261 §7.3.1) that
    /// the stack splits into elements.
    pub fn is_list(&self) -> bool {
        matches!(
            self,
            HeaderName::Via
                | HeaderName::Contact
                | HeaderName::Route
                | HeaderName::RecordRoute
                | HeaderName::Path
                | HeaderName::Require
                | HeaderName::ProxyRequire
                | HeaderName::Supported
                | HeaderName::Unsupported
                | HeaderName::Allow
                | HeaderName::Accept
        )
    }

    /// Headers that may appear at most once (RFC 3261 §7.3.1, §20).
    pub fn is_single(&self) -> bool {
        matches!(
            self,
            HeaderName::From
                | HeaderName::To
                | HeaderName::CallId
                | HeaderName::CSeq
                | HeaderName::MaxForwards
                | HeaderName::ContentLength
                | HeaderName::ContentType
        )
    }
}

impl fmt::Display for HeaderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a typed header value did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The value does not match the header's grammar.
    #[error("malformed value")]
    Syntax,
    /// A number is out of the range the RFC allows.
    #[error("number out of range")]
    Range,
    /// The URI inside the value does not parse.
    #[error("invalid URI: {0}")]
    Uri(#[from] super::uri::UriError),
}

/// One Via value: `SIP/2.0/transport sent-by *(;params)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Via<'a> {
    /// The transport token as written (`UDP`, `TCP`, `TLS`, `SCTP`, `WS`, or any token).
    pub transport: &'a str,
    /// The sent-by host.
    pub host: Host<'a>,
    /// The sent-by port.
    pub port: Option<u16>,
    /// The parameters (`branch`, `received`, `rport`, `maddr`, ...).
    pub params: Params<'a>,
}

/// The RFC 3261 branch magic cookie (§8.1.1.7).
pub const BRANCH_COOKIE: &str = "z9hG4bK";

impl<'a> Via<'a> {
    /// Parses one Via value (after list splitting).
    pub fn parse(v: &'a str) -> Result<Self, HeaderError> {
        // sent-protocol = protocol-name SLASH protocol-version SLASH transport,
        // where SLASH allows white space around it.
        let (name, rest) = v.split_once('/').ok_or(HeaderError::Syntax)?;
        let (version, rest) = rest.split_once('/').ok_or(HeaderError::Syntax)?;
        if !trim_ws(name).eq_ignore_ascii_case("SIP") || trim_ws(version) != "2.0" {
            return Err(HeaderError::Syntax);
        }
        let rest = rest.trim_start_matches([' ', '\t']);
        let tlen = rest.bytes().take_while(|b| is_token_char(*b)).count();
        let transport = &rest[..tlen];
        if transport.is_empty() {
            return Err(HeaderError::Syntax);
        }
        let rest = &rest[tlen..];
        if !rest.starts_with([' ', '\t']) {
            return Err(HeaderError::Syntax);
        }
        let rest = trim_ws(rest);
        let (sent_by, params) = match find_unquoted(rest, b';') {
            Some(i) => (trim_ws(&rest[..i]), Some(&rest[i + 1..])),
            None => (rest, None),
        };
        if sent_by.contains([' ', '\t']) {
            return Err(HeaderError::Syntax);
        }
        let (host, port) = parse_hostport(sent_by)?;
        let params = Params::parse_header_params(params).map_err(|_| HeaderError::Syntax)?;
        if let Some(Some(r)) = params.get("received") {
            // RFC 5118 §4.5: accept an IPv6 received with or without brackets.
            let ok = r.parse::<std::net::IpAddr>().is_ok() || parse_host(r).is_ok();
            if !ok {
                return Err(HeaderError::Syntax);
            }
        }
        if let Some(Some(p)) = params.get("rport") {
            p.parse::<u16>().map_err(|_| HeaderError::Syntax)?;
        }
        Ok(Via {
            transport,
            host,
            port,
            params,
        })
    }

    /// The `branch` parameter.
    pub fn branch(&self) -> Option<&'a str> {
        self.params.get("branch").flatten()
    }

    /// True when the branch starts with the RFC 3261 magic cookie.
    pub fn is_rfc3261(&self) -> bool {
        self.branch()
            .is_some_and(|b| b.len() > BRANCH_COOKIE.len() && b.starts_with(BRANCH_COOKIE))
    }

    /// The `received` parameter as an address (RFC 3261 §18.2.1).
    pub fn received(&self) -> Option<std::net::IpAddr> {
        let r = self.params.get("received")??;
        let r = r
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(r);
        r.parse().ok()
    }

    /// The `rport` parameter (RFC 3581): `Some(None)` when present without value.
    pub fn rport(&self) -> Option<Option<u16>> {
        self.params
            .get("rport")
            .map(|v| v.and_then(|p| p.parse().ok()))
    }
}

/// A `name-addr` or `addr-spec` value with header parameters: From, To,
/// Contact, Route, Record-Route, Path, Refer-To.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameAddr<'a> {
    /// The display name as written (quotes included when quoted), if any.
    pub display: Option<&'a str>,
    /// The URI (the part in `<>`, or the bare addr-spec).
    pub uri: Uri<'a>,
    /// The URI text as written.
    pub uri_raw: &'a str,
    /// True when the URI was written in angle brackets.
    pub bracketed: bool,
    /// Header parameters after the address (`tag`, `expires`, `q`, ...).
    pub params: Params<'a>,
}

impl<'a> NameAddr<'a> {
    /// Parses one value (after list splitting, for list headers).
    ///
    /// Strict where RFC 4475 asks for it: no white space inside `<>`, display
    /// names are a quoted string or tokens, and an addr-spec without `<>`
    /// cannot carry `?headers` or URI parameters (they are header parameters).
    pub fn parse(v: &'a str) -> Result<Self, HeaderError> {
        let v = trim_ws(v);
        let (display, rest) = if v.starts_with('"') {
            let (q, rest) = quoted_string(v).ok_or(HeaderError::Syntax)?;
            let _ = q;
            let consumed = v.len() - rest.len();
            (Some(&v[..consumed]), rest.trim_start_matches([' ', '\t']))
        } else if let Some(lt) = v.find('<') {
            let d = trim_ws(&v[..lt]);
            if !d.is_empty() && !d.split([' ', '\t']).filter(|w| !w.is_empty()).all(is_token) {
                return Err(HeaderError::Syntax);
            }
            (if d.is_empty() { None } else { Some(d) }, &v[lt..])
        } else {
            (None, v)
        };
        if let Some(inner) = rest.strip_prefix('<') {
            let end = inner.find('>').ok_or(HeaderError::Syntax)?;
            let uri_raw = &inner[..end];
            let after = trim_ws(&inner[end + 1..]);
            let params = match after {
                "" => None,
                p => Some(p.strip_prefix(';').ok_or(HeaderError::Syntax)?),
            };
            let uri = Uri::parse(uri_raw)?;
            let params = Params::parse_header_params(params).map_err(|_| HeaderError::Syntax)?;
            check_tag(&params)?;
            return Ok(NameAddr {
                display,
                uri,
                uri_raw,
                bracketed: true,
                params,
            });
        }
        if display.is_some() {
            return Err(HeaderError::Syntax);
        }
        // addr-spec form: the first ';' starts header parameters and the URI
        // may not contain ',', '?' or ';' (RFC 3261 §20.10).
        let (uri_raw, params) = match rest.find(';') {
            Some(i) => (trim_ws(&rest[..i]), Some(&rest[i + 1..])),
            None => (rest, None),
        };
        if uri_raw.contains(['?', ',', ' ', '\t']) {
            return Err(HeaderError::Syntax);
        }
        let uri = Uri::parse(uri_raw)?;
        let params = Params::parse_header_params(params).map_err(|_| HeaderError::Syntax)?;
        check_tag(&params)?;
        Ok(NameAddr {
            display,
            uri,
            uri_raw,
            bracketed: false,
            params,
        })
    }

    /// The `tag` parameter.
    pub fn tag(&self) -> Option<&'a str> {
        self.params.get("tag").flatten()
    }
}

/// `tag-param = "tag" EQUAL token` (RFC 3261 §25.1): a tag without a value
/// is malformed (it would read as "no tag", and a response would add a second).
fn check_tag(params: &Params<'_>) -> Result<(), HeaderError> {
    match params.get("tag") {
        Some(None) => Err(HeaderError::Syntax),
        _ => Ok(()),
    }
}

/// The Contact header value `*` or a list of addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contacts<'a> {
    /// `Contact: *` (remove all bindings, RFC 3261 §10.2.2).
    Star,
    /// Addresses in order.
    List(Vec<NameAddr<'a>>),
}

/// `CSeq: number method`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CSeq {
    /// The sequence number (below 2**31, RFC 3261 §8.1.1.5).
    pub seq: u32,
    /// The method.
    pub method: Method,
}

impl CSeq {
    /// Parses a CSeq value.
    pub fn parse(v: &str) -> Result<Self, HeaderError> {
        let v = trim_ws(v);
        let n = v.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return Err(HeaderError::Syntax);
        }
        let num = &v[..n];
        let rest = &v[n..];
        if !rest.starts_with([' ', '\t']) {
            return Err(HeaderError::Syntax);
        }
        let m = trim_ws(rest);
        if !is_token(m) {
            return Err(HeaderError::Syntax);
        }
        let seq: u64 = if num.len() > 10 {
            return Err(HeaderError::Range);
        } else {
            num.parse().map_err(|_| HeaderError::Range)?
        };
        if seq >= 1 << 31 {
            return Err(HeaderError::Range);
        }
        Ok(CSeq {
            seq: seq as u32,
            method: Method::from_token(m),
        })
    }
}

/// Parses a non-negative decimal with an upper bound, accepting leading zeros.
pub fn parse_bounded(v: &str, max: u64) -> Result<u64, HeaderError> {
    let v = trim_ws(v);
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HeaderError::Syntax);
    }
    let digits = v.trim_start_matches('0');
    if digits.len() > 19 {
        return Err(HeaderError::Range);
    }
    let n: u64 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| HeaderError::Range)?
    };
    if n > max {
        return Err(HeaderError::Range);
    }
    Ok(n)
}

/// Parses `delta-seconds`, saturating at 2**32-1 as RFC 3261 §25.1 allows for
/// Expires values.
pub fn parse_delta_seconds(v: &str) -> Result<u32, HeaderError> {
    match parse_bounded(v, u32::MAX as u64) {
        Ok(n) => Ok(n as u32),
        Err(HeaderError::Range) => Ok(u32::MAX),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_and_case_insensitive_names() {
        assert_eq!(HeaderName::from_wire("v"), HeaderName::Via);
        assert_eq!(
            HeaderName::from_wire("MaX-fOrWaRdS"),
            HeaderName::MaxForwards
        );
        assert_eq!(HeaderName::from_wire("i"), HeaderName::CallId);
        assert_eq!(HeaderName::from_wire("l"), HeaderName::ContentLength);
        assert_eq!(HeaderName::from_wire("X-Custom"), HeaderName::Other);
    }

    #[test]
    fn via_parts() {
        let v = Via::parse("SIP  /   2.0 /UDP    192.0.2.2;branch=390skdjuw").unwrap();
        assert_eq!(v.transport, "UDP");
        assert_eq!(v.host, Host::V4("192.0.2.2".parse().unwrap()));
        assert_eq!(v.branch(), Some("390skdjuw"));
        assert!(!v.is_rfc3261());
        let v = Via::parse(
            "SIP/2.0/TLS [2001:db8::9:1]:5061;branch=z9hG4bKas;received=[2001:db8::9:255];rport=7",
        )
        .unwrap();
        assert_eq!(v.port, Some(5061));
        assert!(v.received().unwrap().is_ipv6());
        assert_eq!(v.rport(), Some(Some(7)));
        let v = Via::parse("SIP/2.0/UDP h;rport;received=2001:db8::9:255").unwrap();
        assert_eq!(v.rport(), Some(None));
        assert!(v.received().unwrap().is_ipv6());
        assert!(Via::parse("SIP/3.0/UDP h").is_err());
        assert!(Via::parse("SIP/2.0/UDP").is_err());
        assert!(Via::parse("SIP/2.0/UDP h;received=not an ip").is_err());
    }

    #[test]
    fn name_addr_forms() {
        let n = NameAddr::parse(
            r#""J Rosenberg \\\""       <sip:jdrosen@example.com> ;  tag = 98asjd8"#,
        )
        .unwrap();
        assert_eq!(n.tag(), Some("98asjd8"));
        assert!(n.bracketed);
        let n = NameAddr::parse("sip:+1972@gw1.example.net;unknownparam").unwrap();
        assert!(n.params.has("unknownparam"));
        assert!(!n.uri.as_sip().unwrap().params.has("unknownparam"));
        let n = NameAddr::parse("<sip:+1972@gw1.example.net;unknownparam>").unwrap();
        assert!(n.uri.as_sip().unwrap().params.has("unknownparam"));
        assert!(NameAddr::parse(r#""caller"<sip:caller@example.com>;tag=1"#).is_ok());
        assert!(NameAddr::parse("token1~` token2'+_ <sip:m@example.com>").is_ok());
        // RFC 4475 invalid forms
        assert!(NameAddr::parse("Bell, Alexander <sip:a.g.bell@example.com>;tag=43").is_err());
        assert!(NameAddr::parse(r#""Mr. J. User <sip:j.user@example.com>"#).is_err());
        assert!(NameAddr::parse("\"W\" < sip:t.watson@example.org >").is_err());
        assert!(NameAddr::parse("sip:user@example.com?Route=%3Csip:sip.example.com%3E").is_err());
        assert!(NameAddr::parse("<sip:user@example.com?Route=%3Csip:sip.example.com%3E>").is_ok());
        // an empty parameter (found by the fuzzer: a trailing ';' made
        // responses that did not reparse once a tag was appended)
        assert!(NameAddr::parse("s:v;").is_err());
        assert!(NameAddr::parse("<sip:a@b>;").is_err());
        assert!(NameAddr::parse("<sip:a@b>;tag=1;").is_err());
        assert!(Via::parse("SIP/2.0/UDP h;").is_err());
        // a tag without a value (fuzz find: the response got a second tag)
        assert!(NameAddr::parse("sip:user@example.net;tag;x=1").is_err());
        assert!(NameAddr::parse("<sip:user@example.net>;tag").is_err());
    }

    #[test]
    fn cseq_bounds() {
        assert_eq!(
            CSeq::parse("0009\r\n  INVITE".replace("\r\n", "").as_str())
                .unwrap()
                .seq,
            9
        );
        assert_eq!(CSeq::parse("1 INVITE").unwrap().method, Method::Invite);
        assert_eq!(CSeq::parse("2147483647 BYE").unwrap().seq, 2147483647);
        assert!(CSeq::parse("2147483648 BYE").is_err());
        assert!(CSeq::parse("36893488147419103232 REGISTER").is_err());
        assert!(CSeq::parse("INVITE").is_err());
        assert!(CSeq::parse("1INVITE").is_err());
    }

    #[test]
    fn bounded_numbers() {
        assert_eq!(parse_bounded("0068", 255), Ok(68));
        assert_eq!(parse_bounded("300", 255), Err(HeaderError::Range));
        assert_eq!(
            parse_delta_seconds("1000000000000000000000000000"),
            Ok(u32::MAX)
        );
        assert!(parse_delta_seconds("-1").is_err());
    }
}
