//! Request validation a UAS, registrar or proxy performs after parsing
//! (RFC 3261 §8.2.1–§8.2.3, §10.3 steps 1–3, §16.3), as pure decisions.
//!
//! Each check returns the [`Rejection`] to send, headers included (Allow,
//! Unsupported, Accept), so every element answers bad requests alike.

use super::{Contacts, Header, HeaderName, Message, Method, Uri, scan};

/// What an element supports, for [`check_request`].
#[derive(Debug, Clone)]
pub struct Caps<'a> {
    /// Methods this element implements (for 405/501 and `Allow`).
    pub methods: &'a [Method],
    /// Option tags this element supports (RFC 3261 §8.2.2.3).
    pub extensions: &'a [&'a str],
    /// Body types this element understands (RFC 3261 §8.2.3).
    pub content_types: &'a [&'a str],
    /// URI schemes accepted in the Request-URI (lower case).
    pub schemes: &'a [&'a str],
    /// True when the element proxies requests: Max-Forwards 0 gives 483 and
    /// Proxy-Require is checked too (RFC 3261 §16.3).
    pub proxy: bool,
}

impl Default for Caps<'static> {
    fn default() -> Self {
        Caps {
            methods: &[
                Method::Invite,
                Method::Ack,
                Method::Bye,
                Method::Cancel,
                Method::Register,
                Method::Options,
                Method::Info,
                Method::Update,
                Method::Prack,
                Method::Message,
            ],
            extensions: &["path", "outbound", "timer", "100rel", "replaces", "gruu"],
            content_types: &[
                "application/sdp",
                "text/plain",
                "application/dtmf-relay",
                "multipart/mixed",
            ],
            schemes: &["sip", "sips", "tel"],
            proxy: false,
        }
    }
}

/// A request refused by a check: the status, reason and extra headers of the
/// response to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Status code.
    pub code: u16,
    /// Reason phrase.
    pub reason: &'static str,
    /// Headers the RFC requires with this status (Allow, Unsupported, Accept ...).
    pub headers: Vec<Header>,
}

impl Rejection {
    fn new(code: u16, reason: &'static str) -> Self {
        Rejection {
            code,
            reason,
            headers: Vec::new(),
        }
    }

    fn with(mut self, name: HeaderName, value: String) -> Self {
        self.headers.push(Header::new(name, &value));
        self
    }

    /// The response to `req` carrying this rejection.
    pub fn response_to(&self, req: &Message, to_tag: Option<&str>) -> Message {
        let mut r = req.response(self.code, self.reason, to_tag);
        for h in &self.headers {
            r.push(h.clone());
        }
        r
    }
}

/// Runs the RFC 3261 §8.2 checks in the RFC's order (method, Request-URI
/// scheme, Require, content), plus Max-Forwards for proxies. ACK is never
/// rejected (it has no response).
pub fn check_request(msg: &Message, caps: &Caps<'_>) -> Result<(), Rejection> {
    let Some(method) = msg.method() else {
        return Ok(());
    };
    if method == Method::Ack {
        return Ok(());
    }
    let allow = || {
        caps.methods
            .iter()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !caps.methods.contains(&method) {
        let known = !matches!(method, Method::Extension(_));
        let r = if known {
            Rejection::new(405, "Method Not Allowed")
        } else {
            Rejection::new(501, "Not Implemented")
        };
        return Err(r.with(HeaderName::Allow, allow()));
    }
    if caps.proxy && msg.max_forwards() == Some(0) && method != Method::Options {
        return Err(Rejection::new(483, "Too Many Hops"));
    }
    let scheme_ok = match msg.request_uri() {
        Some(u) => caps
            .schemes
            .iter()
            .any(|s| u.scheme().eq_ignore_ascii_case(s)),
        None => false,
    };
    if !scheme_ok {
        return Err(Rejection::new(416, "Unsupported URI Scheme"));
    }
    if method != Method::Cancel {
        let mut names = vec![HeaderName::Require];
        if caps.proxy {
            names.push(HeaderName::ProxyRequire);
        }
        let unsupported: Vec<&str> = names
            .into_iter()
            .flat_map(|n| msg.values(n))
            .filter(|tag| !caps.extensions.iter().any(|e| e.eq_ignore_ascii_case(tag)))
            .collect();
        if !unsupported.is_empty() {
            return Err(Rejection::new(420, "Bad Extension")
                .with(HeaderName::Unsupported, unsupported.join(", ")));
        }
    }
    if !msg.body().is_empty() {
        let ct = msg.header(HeaderName::ContentType).map(media_type);
        let ok = ct.is_some_and(|ct| {
            caps.content_types
                .iter()
                .any(|c| c.eq_ignore_ascii_case(&ct))
        });
        let enc_ok = msg
            .values(HeaderName::ContentEncoding)
            .all(|e| e.eq_ignore_ascii_case("identity"));
        if !ok || !enc_ok {
            return Err(Rejection::new(415, "Unsupported Media Type")
                .with(HeaderName::Accept, caps.content_types.join(", ")));
        }
    }
    if method == Method::Invite && !accepts(msg, "application/sdp") {
        return Err(Rejection::new(406, "Not Acceptable").with(
            HeaderName::Warning,
            "399 - \"application/sdp is not in Accept\"".into(),
        ));
    }
    Ok(())
}

/// Registrar checks (RFC 3261 §10.3 steps 2–3 and 6 as far as syntax goes):
/// the To must be a SIP or SIPS URI, the Contacts must parse, and `*` only
/// with Expires 0 and alone.
pub fn check_register(msg: &Message) -> Result<(), Rejection> {
    let to = msg.to().map_err(|_| Rejection::new(400, "Bad Request"))?;
    if !matches!(to.uri, Uri::Sip(_)) {
        return Err(Rejection::new(400, "Bad Request"));
    }
    match msg.contacts() {
        Err(_) => Err(Rejection::new(400, "Bad Request")),
        Ok(Contacts::Star) if msg.expires() != Some(0) => Err(Rejection::new(400, "Bad Request")),
        Ok(_) => Ok(()),
    }
}

/// The `type/subtype` of a Content-Type value, lower-cased, without parameters.
pub fn media_type(v: &str) -> String {
    let t = v.split(';').next().unwrap_or("");
    scan::trim_ws(t).to_ascii_lowercase()
}

/// True when the request's Accept (if any) admits `media` (RFC 3261 §20.1).
pub fn accepts(msg: &Message, media: &str) -> bool {
    let mut any = false;
    for v in msg.values(HeaderName::Accept) {
        any = true;
        let t = media_type(v);
        if t == "*/*" || t == media {
            return true;
        }
        if let (Some((a, "*")), Some((b, _))) = (t.split_once('/'), media.split_once('/'))
            && a == b
        {
            return true;
        }
    }
    !any
}
