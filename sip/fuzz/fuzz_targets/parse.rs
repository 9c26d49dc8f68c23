//! Fuzz target for the SIP wire parser and serializer (`sip::msg`).
//!
//! Arbitrary bytes go through the two ways the transports feed the parser:
//!
//! - as one UDP datagram: [`Message::parse`] with [`Framing::Datagram`];
//! - as a TCP/TLS byte stream: [`frame`] repeatedly (keep-alives skipped),
//!   each framed message parsed with [`Framing::Stream`].
//!
//! Every parsed message has all its typed accessors read, and these
//! invariants are asserted (a failure is a crash):
//!
//! 1. `parse` succeeding means the headers `validate` promises are readable
//!    (Via, From, To, Call-ID, CSeq, CSeq method = request method).
//! 2. `to_bytes()` reparses to an equal message: same start line, same header
//!    lines and values, same body (unmodified and after a proxy-style edit:
//!    a Via pushed and popped, Max-Forwards decremented, Request-URI reset).
//! 3. Bytes written by the serializer are framed by [`frame`] to exactly
//!    their length, and on a stream [`frame`] and `parse` agree on where a
//!    message ends.
//! 4. A response built from a parsed request (and every check rejection)
//!    parses, carries the request's Call-ID and CSeq, and has a To tag.
//! 5. A parse failure yields a status, and [`error_response`] never panics;
//!    when it answers, it answers with that status.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sip::msg::check::{Caps, check_register, check_request};
use sip::msg::{
    Contacts, Frame, Framing, HeaderName, Limits, Message, Method, NameAddr, ParseError, StartLine,
    Uri, Via, error_response, frame,
};

/// Every known header name, for `header()` / `values()`.
const NAMES: &[HeaderName] = &[
    HeaderName::Via,
    HeaderName::From,
    HeaderName::To,
    HeaderName::CallId,
    HeaderName::CSeq,
    HeaderName::Contact,
    HeaderName::MaxForwards,
    HeaderName::ContentLength,
    HeaderName::ContentType,
    HeaderName::ContentEncoding,
    HeaderName::Route,
    HeaderName::RecordRoute,
    HeaderName::Path,
    HeaderName::Require,
    HeaderName::ProxyRequire,
    HeaderName::Supported,
    HeaderName::Unsupported,
    HeaderName::Allow,
    HeaderName::Accept,
    HeaderName::Expires,
    HeaderName::MinExpires,
    HeaderName::Authorization,
    HeaderName::ProxyAuthorization,
    HeaderName::WwwAuthenticate,
    HeaderName::ProxyAuthenticate,
    HeaderName::UserAgent,
    HeaderName::Server,
    HeaderName::Subject,
    HeaderName::Event,
    HeaderName::ReferTo,
    HeaderName::SessionExpires,
    HeaderName::MinSe,
    HeaderName::RSeq,
    HeaderName::RAck,
    HeaderName::RetryAfter,
    HeaderName::Warning,
    HeaderName::Date,
    HeaderName::Timestamp,
    HeaderName::Reason,
    HeaderName::Other,
];

/// The Via a proxy would push in invariant 2.
const FUZZ_VIA: &str = "SIP/2.0/UDP fuzz.invalid:5060;branch=z9hG4bKfuzz;rport";

/// Stream units handled per input, so a long run of pings stays cheap.
const MAX_UNITS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    datagram(data, &limits);
    stream(data, &limits);
});

fn datagram(data: &[u8], limits: &Limits) {
    match Message::parse(Bytes::copy_from_slice(data), Framing::Datagram, limits) {
        Ok(m) => exercise(&m, Framing::Datagram),
        Err(e) => rejected(data, &e),
    }
}

fn stream(data: &[u8], limits: &Limits) {
    let mut buf = data;
    for _ in 0..MAX_UNITS {
        match frame(buf, limits) {
            Ok(Frame::Incomplete) => return,
            Ok(Frame::Ping(n) | Frame::Pong(n)) => {
                assert!(
                    n > 0 && n <= buf.len(),
                    "keep-alive of {n} in {}",
                    buf.len()
                );
                buf = &buf[n..];
            }
            Ok(Frame::Message(n)) => {
                assert!(n > 0 && n <= buf.len(), "message of {n} in {}", buf.len());
                let unit = &buf[..n];
                match Message::parse(Bytes::copy_from_slice(unit), Framing::Stream, limits) {
                    Ok(m) => {
                        // Invariant 3: framing and parsing end the message at
                        // the same octet, or the stream desynchronises.
                        let lead = unit
                            .iter()
                            .take_while(|b| matches!(b, b'\r' | b'\n'))
                            .count();
                        assert_eq!(
                            lead + m.to_bytes().len(),
                            n,
                            "frame() and parse() disagree on the message length"
                        );
                        exercise(&m, Framing::Stream);
                    }
                    Err(e) => rejected(unit, &e),
                }
                buf = &buf[n..];
            }
            Err(e) => {
                rejected(buf, &e);
                return;
            }
        }
    }
}

/// Invariant 5.
fn rejected(input: &[u8], e: &ParseError) {
    let (code, reason) = e.status();
    assert!((400..=599).contains(&code) && !reason.is_empty());
    let _ = e.breaks_framing();
    let _ = e.to_string();
    if let Some(r) = error_response(input, e) {
        assert_eq!(r.status(), Some(code));
        let wire = r.to_bytes();
        // The copied headers are as written and may be the very reason the
        // request failed: the answer need not parse, only not panic.
        let _ = Message::parse(wire, Framing::Datagram, &Limits::default());
    }
}

/// Limits for reparsing serializer output, which may be a few lines longer
/// than the input.
fn roomy() -> Limits {
    let d = Limits::default();
    Limits {
        max_message: d.max_message + 4096,
        max_body: d.max_body,
        max_headers: d.max_headers + 8,
    }
}

fn exercise(m: &Message, framing: Framing) {
    read_all(m);

    // Invariant 1.
    assert!(
        m.top_via().is_ok(),
        "parsed message without a valid top Via"
    );
    assert!(
        m.from().is_ok() && m.to().is_ok(),
        "parsed message without From/To"
    );
    assert!(m.call_id().is_some_and(|c| !c.is_empty()));
    let cseq = m.cseq().expect("parse() validated CSeq");
    if let StartLine::Request { method, .. } = m.start_line() {
        assert_eq!(&cseq.method, method);
    }

    // Invariant 2, unmodified: the original bytes come back.
    let wire = m.to_bytes();
    let again = Message::parse(wire.clone(), framing, &Limits::default())
        .unwrap_or_else(|e| panic!("to_bytes() of a parsed message does not reparse: {e}"));
    assert_same(m, &again, "unmodified");

    // Invariant 2, modified the way a proxy modifies requests.
    let mut edited = m.clone();
    edited.push_front(sip::msg::Header::new(HeaderName::Via, FUZZ_VIA));
    if m.is_request() {
        assert!(edited.decrement_max_forwards() || m.max_forwards() == Some(0));
        if let Some(uri) = m.request_uri_str() {
            let uri = uri.to_owned();
            edited.set_request_uri(&uri);
        }
    }
    let r = reparse_written(&edited, "Via pushed");
    assert_eq!(
        r.top_via().ok().and_then(|v| v.branch()),
        Some("z9hG4bKfuzz")
    );
    let vias_before: Vec<&str> = m.values(HeaderName::Via).collect();
    assert!(edited.pop_front_value(HeaderName::Via));
    let vias_after: Vec<&str> = edited.values(HeaderName::Via).collect();
    assert_eq!(
        vias_before, vias_after,
        "push then pop of a Via changed the Vias"
    );
    reparse_written(&edited, "Via pushed and popped");

    // A proxy forwarding a response pops the top Via; what is left must
    // survive a round trip too (when a Via is left at all).
    let mut popped = m.clone();
    assert!(popped.pop_front_value(HeaderName::Via));
    let rest: Vec<&str> = m.values(HeaderName::Via).skip(1).collect();
    let left: Vec<&str> = popped.values(HeaderName::Via).collect();
    assert_eq!(
        rest, left,
        "pop_front_value(Via) changed the remaining Vias"
    );
    if !left.is_empty() {
        reparse_written(&popped, "top Via popped");
    }

    // Invariant 4.
    if m.is_request() {
        let resp = m.response(200, "OK", Some("fuzztag"));
        check_response(m, &resp, 200);
        let trying = m.response(100, "Trying", None);
        check_response(m, &trying, 100);
        let mut caps = Caps::default();
        for proxy in [false, true] {
            caps.proxy = proxy;
            if let Err(rej) = check_request(m, &caps) {
                check_response(m, &rej.response_to(m, Some("fuzztag")), rej.code);
            }
        }
        if m.is_method(&Method::Register)
            && let Err(rej) = check_register(m)
        {
            check_response(m, &rej.response_to(m, Some("fuzztag")), rej.code);
        }
    }
}

/// Serializes a built or edited message, checks `frame` sizes it exactly,
/// and reparses it on a stream and as a datagram: both must give back the
/// message (plus the Content-Length the writer adds when there was none).
fn reparse_written(m: &Message, what: &str) -> Message {
    let limits = roomy();
    let wire = m.to_bytes();
    assert_eq!(
        frame(&wire, &limits),
        Ok(Frame::Message(wire.len())),
        "{what}: frame() does not size serializer output"
    );
    let r = Message::parse(wire.clone(), Framing::Stream, &limits)
        .unwrap_or_else(|e| panic!("{what}: serializer output does not reparse: {e}\n{m:?}"));
    let d = Message::parse(wire, Framing::Datagram, &limits)
        .unwrap_or_else(|e| panic!("{what}: serializer output does not reparse: {e}\n{m:?}"));
    assert_same(&r, &d, what);
    let mut expect = m.clone();
    if m.header(HeaderName::ContentLength).is_none() {
        expect.push(sip::msg::Header::new(
            HeaderName::ContentLength,
            &m.body().len().to_string(),
        ));
    }
    assert_same(&expect, &r, what);
    read_all(&r);
    r
}

fn check_response(req: &Message, resp: &Message, code: u16) {
    let r = reparse_written(resp, "response to a parsed request");
    assert_eq!(r.status(), Some(code));
    assert_eq!(r.call_id(), req.call_id());
    assert_eq!(r.cseq().ok(), req.cseq().ok());
    assert!(r.is_method(&req.cseq().expect("validated").method));
    assert_eq!(
        r.values(HeaderName::Via).collect::<Vec<_>>(),
        req.values(HeaderName::Via).collect::<Vec<_>>(),
        "response Vias differ from the request's"
    );
    if code > 100 {
        assert!(
            r.to().ok().and_then(|t| t.tag()).is_some(),
            "response {code} without a To tag"
        );
    }
}

/// Same start line, header lines (name, line as written, value) and body.
fn assert_same(a: &Message, b: &Message, what: &str) {
    assert_eq!(a.start_line(), b.start_line(), "{what}: start line differs");
    assert_eq!(
        a.headers().len(),
        b.headers().len(),
        "{what}: header count differs"
    );
    for (x, y) in a.headers().iter().zip(b.headers()) {
        assert_eq!(x.name(), y.name(), "{what}: header name differs");
        assert_eq!(
            x.name_str(),
            y.name_str(),
            "{what}: header name text differs"
        );
        assert_eq!(x.line(), y.line(), "{what}: header line differs");
        assert_eq!(x.value(), y.value(), "{what}: header value differs");
    }
    assert_eq!(a.body(), b.body(), "{what}: body differs");
}

/// Reads every typed accessor, so a panic in any of them is found.
fn read_all(m: &Message) {
    let _ = format!("{m:?}");
    let _ = m.to_string();
    let _ = m.is_request();
    let _ = m.method();
    let _ = m.is_method(&Method::Invite);
    let _ = m.status();
    let _ = m.reason();
    if let Some(u) = m.request_uri() {
        uri(&u);
    }
    let _ = m.request_uri_str();
    for h in m.headers() {
        let _ = format!("{h:?}");
        let _ = (h.name(), h.value(), h.line());
        assert!(
            h.is(h.name_str().trim_end()),
            "header is not called its own name"
        );
    }
    for &n in NAMES {
        let _ = m.header(n);
        for v in m.values(n) {
            let _ = v.len();
        }
        let _ = n.is_list();
        let _ = n.is_single();
        if n != HeaderName::Other {
            assert_eq!(HeaderName::from_wire(n.as_str()), n);
            let _ = m.header_named(n.as_str());
        }
    }
    let _ = m.call_id();
    if let Ok(c) = m.cseq() {
        let _ = (c.seq, c.method.as_str());
    }
    if let Ok(a) = m.from() {
        name_addr(&a);
    }
    if let Ok(a) = m.to() {
        name_addr(&a);
    }
    if let Ok(v) = m.top_via() {
        via(&v);
    }
    for v in m.vias().flatten() {
        via(&v);
    }
    match m.contacts() {
        Ok(Contacts::List(l)) => l.iter().for_each(name_addr),
        Ok(Contacts::Star) | Err(_) => {}
    }
    for n in [HeaderName::Route, HeaderName::RecordRoute, HeaderName::Path] {
        if let Ok(l) = m.name_addrs(n) {
            l.iter().for_each(name_addr);
        }
    }
    let _ = m.max_forwards();
    let _ = m.expires();
    let _ = m.body().len();
}

fn via(v: &Via<'_>) {
    let _ = (v.transport, v.port, v.host.to_string(), v.host.ip());
    let _ = (v.branch(), v.is_rfc3261(), v.received(), v.rport());
    for p in v.params.iter() {
        let _ = p;
    }
}

fn name_addr(a: &NameAddr<'_>) {
    let _ = (a.display, a.uri_raw, a.bracketed, a.tag());
    uri(&a.uri);
    for p in a.params.iter() {
        let _ = p;
    }
}

fn uri(u: &Uri<'_>) {
    let _ = (u.scheme(), u.to_string());
    if let Some(s) = u.as_sip() {
        let _ = (
            s.user_decoded(),
            s.transport(),
            s.aor(),
            s.host.ip(),
            s.port,
        );
        for p in s.params.iter() {
            let _ = p;
        }
    }
}
