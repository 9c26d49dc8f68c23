//! The SIP wire format: parser, typed access and serializer (RFC 3261 §7, §20,
//! §25; RFC 5118 for IPv6).
//!
//! A [`Message`] keeps the bytes it was parsed from: the start line and every
//! header line are [`Bytes`] slices of the input, indexed once at parse time;
//! typed values (Via, From, CSeq, URIs, ...) are parsed on demand from those
//! slices and borrow them. Serializing a message that was not modified returns
//! the original bytes; a modified one is written from its (possibly new) lines.
//!
//! ```text
//!   generic-message = start-line *message-header CRLF [ message-body ]
//!   start-line      = Request-Line / Status-Line
//! ```
//!
//! Framing (RFC 3261 §18.3): on a stream, [`frame`] finds where the next
//! message ends using Content-Length (and recognises RFC 5626 CRLF keep-alives);
//! on a datagram, octets past Content-Length are ignored and a Content-Length
//! larger than the datagram is an error.

pub mod check;
pub mod error;
pub mod header;
pub mod scan;
pub mod uri;

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

pub use error::ParseError;
pub use header::{
    BRANCH_COOKIE, CSeq, Contacts, HeaderError, HeaderName, NameAddr, Via, parse_bounded,
    parse_delta_seconds,
};
pub use scan::Params;
pub use uri::{Host, SipUri, TelUri, Uri, UriError};

/// A SIP method. Methods are case-sensitive (RFC 3261 §7.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Method {
    /// INVITE
    Invite,
    /// ACK
    Ack,
    /// BYE
    Bye,
    /// CANCEL
    Cancel,
    /// REGISTER
    Register,
    /// OPTIONS
    Options,
    /// INFO (RFC 6086)
    Info,
    /// UPDATE (RFC 3311)
    Update,
    /// PRACK (RFC 3262)
    Prack,
    /// SUBSCRIBE (RFC 6665)
    Subscribe,
    /// NOTIFY (RFC 6665)
    Notify,
    /// REFER (RFC 3515)
    Refer,
    /// MESSAGE (RFC 3428)
    Message,
    /// PUBLISH (RFC 3903)
    Publish,
    /// Any other token.
    Extension(Box<str>),
}

impl Method {
    /// Maps a method token to a method.
    pub fn from_token(t: &str) -> Method {
        match t {
            "INVITE" => Method::Invite,
            "ACK" => Method::Ack,
            "BYE" => Method::Bye,
            "CANCEL" => Method::Cancel,
            "REGISTER" => Method::Register,
            "OPTIONS" => Method::Options,
            "INFO" => Method::Info,
            "UPDATE" => Method::Update,
            "PRACK" => Method::Prack,
            "SUBSCRIBE" => Method::Subscribe,
            "NOTIFY" => Method::Notify,
            "REFER" => Method::Refer,
            "MESSAGE" => Method::Message,
            "PUBLISH" => Method::Publish,
            other => Method::Extension(other.into()),
        }
    }

    /// The method token.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Invite => "INVITE",
            Method::Ack => "ACK",
            Method::Bye => "BYE",
            Method::Cancel => "CANCEL",
            Method::Register => "REGISTER",
            Method::Options => "OPTIONS",
            Method::Info => "INFO",
            Method::Update => "UPDATE",
            Method::Prack => "PRACK",
            Method::Subscribe => "SUBSCRIBE",
            Method::Notify => "NOTIFY",
            Method::Refer => "REFER",
            Method::Message => "MESSAGE",
            Method::Publish => "PUBLISH",
            Method::Extension(s) => s,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Size limits applied while framing and parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message, headers and body, in octets.
    pub max_message: usize,
    /// Largest body in octets.
    pub max_body: usize,
    /// Most header lines (after unfolding).
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message: 65_535,
            max_body: 60_000,
            max_headers: 256,
        }
    }
}

/// How the message arrived: datagrams carry one message each, streams need
/// Content-Length to frame (RFC 3261 §18.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// UDP: the buffer is one datagram.
    Datagram,
    /// TCP/TLS: the buffer is exactly one message as found by [`frame`].
    Stream,
}

/// One header line.
#[derive(Clone, PartialEq, Eq)]
pub struct Header {
    name: HeaderName,
    line: Bytes,
    name_len: usize,
    value: Bytes,
}

impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name_str(), self.value())
    }
}

impl Header {
    /// A header with a known name, written in its long form.
    pub fn new(name: HeaderName, value: &str) -> Header {
        Self::build(name, name.as_str(), value)
    }

    /// A header with any name (known names are recognised).
    pub fn named(name: &str, value: &str) -> Header {
        Self::build(HeaderName::from_wire(name), name, value)
    }

    fn build(name: HeaderName, text: &str, value: &str) -> Header {
        let mut line = BytesMut::with_capacity(text.len() + 2 + value.len());
        line.put_slice(text.as_bytes());
        line.put_slice(b": ");
        line.put_slice(value.as_bytes());
        let line = line.freeze();
        let value = line.slice(text.len() + 2..);
        Header {
            name,
            line,
            name_len: text.len(),
            value,
        }
    }

    /// The recognised name ([`HeaderName::Other`] for unknown headers).
    pub fn name(&self) -> HeaderName {
        self.name
    }

    /// The name as written.
    pub fn name_str(&self) -> &str {
        std::str::from_utf8(&self.line[..self.name_len]).unwrap_or_default()
    }

    /// The value, trimmed and unfolded.
    pub fn value(&self) -> &str {
        std::str::from_utf8(&self.value).unwrap_or_default()
    }

    /// The whole line as written (folds included), without CRLF.
    pub fn line(&self) -> &[u8] {
        &self.line
    }

    /// True when this header has `name` (compact forms and case ignored).
    pub fn is(&self, name: &str) -> bool {
        match self.name {
            HeaderName::Other => self.name_str().trim_end().eq_ignore_ascii_case(name),
            known => known == HeaderName::from_wire(name),
        }
    }
}

/// The first line of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartLine {
    /// `Method SP Request-URI SP SIP-Version`.
    Request {
        /// The method.
        method: Method,
        /// The Request-URI text.
        uri: Bytes,
    },
    /// `SIP-Version SP Status-Code SP Reason-Phrase`.
    Response {
        /// The status code (100..=699).
        code: u16,
        /// The reason phrase (UTF-8, may be empty).
        reason: Bytes,
    },
}

/// A SIP request or response.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    start: StartLine,
    start_raw: Bytes,
    headers: Vec<Header>,
    body: Bytes,
    /// The exact bytes the message was parsed from, while unmodified.
    wire: Option<Bytes>,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("start", &String::from_utf8_lossy(&self.start_raw))
            .field("headers", &self.headers)
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// What [`frame`] found at the start of a stream buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// More octets are needed.
    Incomplete,
    /// A CRLFCRLF keep-alive ping (RFC 5626 §4.4.1) of this many octets: answer with CRLF.
    Ping(usize),
    /// A single CRLF (a pong, or noise before a message) of this many octets: discard.
    Pong(usize),
    /// A complete message of this many octets.
    Message(usize),
}

/// Finds the next unit in a stream buffer (RFC 3261 §18.3, RFC 5626 §4.4.1).
pub fn frame(buf: &[u8], limits: &Limits) -> Result<Frame, ParseError> {
    if buf.starts_with(b"\r\n\r\n") {
        return Ok(Frame::Ping(4));
    }
    if buf.starts_with(b"\r\n") {
        // A CRLF followed by something else: a pong, or leading noise.
        return Ok(if buf.len() >= 4 || (buf.len() > 2 && buf[2] != b'\r') {
            Frame::Pong(2)
        } else {
            Frame::Incomplete
        });
    }
    let Some(hdr_end) = find_crlfcrlf(buf) else {
        if buf.len() > limits.max_message {
            return Err(ParseError::TooLarge);
        }
        return Ok(Frame::Incomplete);
    };
    let head = std::str::from_utf8(&buf[..hdr_end]).map_err(|_| ParseError::NotUtf8)?;
    let mut cl = None;
    for (name, value) in header_lines(head) {
        if HeaderName::from_wire(name) == HeaderName::ContentLength {
            if cl.is_some() {
                return Err(ParseError::Repeated(HeaderName::ContentLength));
            }
            let n = parse_bounded(&value, limits.max_message as u64).map_err(|e| match e {
                HeaderError::Range => ParseError::TooLarge,
                e => ParseError::Header(HeaderName::ContentLength, e),
            })?;
            cl = Some(n as usize);
        }
    }
    let body = cl.ok_or(ParseError::NoContentLength)?;
    if body > limits.max_body {
        return Err(ParseError::BodyTooLarge);
    }
    let total = hdr_end + 4 + body;
    if total > limits.max_message {
        return Err(ParseError::TooLarge);
    }
    Ok(if buf.len() >= total {
        Frame::Message(total)
    } else {
        Frame::Incomplete
    })
}

fn find_crlfcrlf(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// Iterates `(name, unfolded value)` over a header section (without start line
/// handling: the first line is skipped). Used by framing before full parsing.
fn header_lines(head: &str) -> impl Iterator<Item = (&str, String)> {
    let mut lines = head.split("\r\n").skip(1).peekable();
    std::iter::from_fn(move || {
        loop {
            let line = lines.next()?;
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let mut value = value.trim().to_string();
            while let Some(next) = lines.peek() {
                if next.starts_with([' ', '\t']) {
                    value.push(' ');
                    value.push_str(next.trim());
                    lines.next();
                } else {
                    break;
                }
            }
            return Some((name.trim_end_matches([' ', '\t']), value));
        }
    })
}

impl Message {
    /// Parses and validates one message.
    ///
    /// Validation covers what every element needs before it can act on a
    /// message: the start line, Via, From, To, Call-ID, CSeq (number below
    /// 2**31, method equal to the request's), Max-Forwards (0..=255),
    /// Content-Length, and headers that may appear once (RFC 3261 §8.1.1,
    /// §7.3.1). Other headers are checked when they are read.
    pub fn parse(buf: Bytes, framing: Framing, limits: &Limits) -> Result<Message, ParseError> {
        let msg = Self::parse_structure(buf, framing, limits)?;
        msg.validate()?;
        Ok(msg)
    }

    /// Parses the structure only: start line, header lines, body framing.
    pub fn parse_structure(
        buf: Bytes,
        framing: Framing,
        limits: &Limits,
    ) -> Result<Message, ParseError> {
        let lead = buf
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
        let buf = buf.slice(lead..);
        if buf.is_empty() {
            return Err(ParseError::Empty);
        }
        if buf.len() > limits.max_message {
            return Err(ParseError::TooLarge);
        }
        let hdr_end = find_crlfcrlf(&buf).ok_or(ParseError::Unterminated)?;
        let head = std::str::from_utf8(&buf[..hdr_end]).map_err(|_| ParseError::NotUtf8)?;
        let first_end = head.find("\r\n").unwrap_or(head.len());
        let start_text = &head[..first_end];
        let start = parse_start_line(&buf, start_text)?;
        let start_raw = buf.slice(0..first_end);

        let mut headers: Vec<Header> = Vec::new();
        let mut last_start = 0;
        // End of the folded header being extended, unfolded once it is complete.
        let mut folded: Option<usize> = None;
        let mut pos = first_end + 2;
        while pos < hdr_end {
            let line_end = head[pos..].find("\r\n").map_or(hdr_end, |i| pos + i);
            let line = &head[pos..line_end];
            if line.starts_with([' ', '\t']) {
                // Continuation of the previous header (folding, RFC 3261 §7.3.1):
                // the line grows to cover the fold, the value is unfolded once
                // (per fold line would be quadratic in the number of folds).
                let prev = headers.last_mut().ok_or(ParseError::HeaderLine)?;
                prev.line = buf.slice(last_start..line_end);
                folded = Some(line_end);
            } else {
                if let Some(end) = folded.take() {
                    unfold_last(&mut headers, &head[last_start..end]);
                }
                if headers.len() >= limits.max_headers {
                    return Err(ParseError::TooManyHeaders);
                }
                let colon = line.find(':').ok_or(ParseError::HeaderLine)?;
                let name = line[..colon].trim_end_matches([' ', '\t']);
                if !scan::is_token(name) {
                    return Err(ParseError::HeaderLine);
                }
                let raw_value = &line[colon + 1..];
                let lead_ws = raw_value.len() - raw_value.trim_start_matches([' ', '\t']).len();
                let vstart = pos + colon + 1 + lead_ws;
                let value = buf.slice(vstart..vstart + scan::trim_ws(raw_value).len());
                headers.push(Header {
                    name: HeaderName::from_wire(name),
                    line: buf.slice(pos..line_end),
                    name_len: name.len(),
                    value,
                });
                last_start = pos;
            }
            pos = line_end + 2;
        }
        if let Some(end) = folded {
            unfold_last(&mut headers, &head[last_start..end]);
        }

        let rest = buf.slice(hdr_end + 4..);
        let mut cl = None;
        for h in headers
            .iter()
            .filter(|h| h.name == HeaderName::ContentLength)
        {
            if cl.is_some() {
                return Err(ParseError::Repeated(HeaderName::ContentLength));
            }
            let n = parse_bounded(h.value(), u32::MAX as u64)
                .map_err(|e| ParseError::Header(HeaderName::ContentLength, e))?;
            cl = Some(n as usize);
        }
        let body = match (cl, framing) {
            (Some(n), _) if n > limits.max_body => return Err(ParseError::BodyTooLarge),
            (Some(n), _) if n > rest.len() => return Err(ParseError::ShortBody),
            (Some(n), _) => rest.slice(..n),
            (None, Framing::Datagram) => rest,
            (None, Framing::Stream) => return Err(ParseError::NoContentLength),
        };
        if body.len() > limits.max_body {
            return Err(ParseError::BodyTooLarge);
        }
        let wire_len = hdr_end + 4 + body.len();
        Ok(Message {
            start,
            start_raw,
            headers,
            body,
            wire: Some(buf.slice(..wire_len)),
        })
    }

    /// Checks the headers every element relies on (see [`Message::parse`]).
    pub fn validate(&self) -> Result<(), ParseError> {
        for name in [
            HeaderName::From,
            HeaderName::To,
            HeaderName::CallId,
            HeaderName::CSeq,
            HeaderName::MaxForwards,
            HeaderName::ContentType,
        ] {
            if self.headers.iter().filter(|h| h.name == name).count() > 1 {
                return Err(ParseError::Repeated(name));
            }
        }
        self.top_via()?;
        // Via = 1#via-parm: an empty Via line is malformed, not skipped.
        if self
            .headers
            .iter()
            .any(|h| h.name == HeaderName::Via && scan::split_list(h.value()).next().is_none())
        {
            return Err(ParseError::Header(HeaderName::Via, HeaderError::Syntax));
        }
        for v in self.vias() {
            v.map_err(|e| ParseError::Header(HeaderName::Via, e))?;
        }
        self.from()?;
        self.to()?;
        let call_id = self
            .call_id()
            .ok_or(ParseError::Missing(HeaderName::CallId))?;
        if call_id.is_empty() || call_id.contains([' ', '\t']) {
            return Err(ParseError::Header(HeaderName::CallId, HeaderError::Syntax));
        }
        let cseq = self.cseq()?;
        if let StartLine::Request { method, .. } = &self.start {
            if cseq.method != *method {
                return Err(ParseError::CSeqMismatch);
            }
            if let Some(v) = self.header(HeaderName::MaxForwards) {
                parse_bounded(v, 255)
                    .map_err(|e| ParseError::Header(HeaderName::MaxForwards, e))?;
            }
        }
        Ok(())
    }

    /// Starts a request with `method` and Request-URI `uri` (no headers yet).
    pub fn request(method: Method, uri: &str) -> Message {
        let raw = Bytes::from(format!("{method} {uri} SIP/2.0"));
        let uri_b = raw.slice(method.as_str().len() + 1..method.as_str().len() + 1 + uri.len());
        Message {
            start: StartLine::Request { method, uri: uri_b },
            start_raw: raw,
            headers: Vec::new(),
            body: Bytes::new(),
            wire: None,
        }
    }

    /// Builds a response to this request (RFC 3261 §8.2.6): Via, From, To,
    /// Call-ID, CSeq (and Timestamp for 100) copied, a To tag added when
    /// `to_tag` is given and the To has none.
    pub fn response(&self, code: u16, reason: &str, to_tag: Option<&str>) -> Message {
        let raw = Bytes::from(format!("SIP/2.0 {code} {reason}"));
        let reason_b = raw.slice(12..);
        let mut headers = Vec::with_capacity(8);
        for h in &self.headers {
            match h.name {
                HeaderName::Via | HeaderName::From | HeaderName::CallId | HeaderName::CSeq => {
                    headers.push(h.clone())
                }
                HeaderName::To => match to_tag {
                    Some(tag) if self.to().is_ok_and(|t| t.tag().is_none()) => {
                        headers.push(Header::new(
                            HeaderName::To,
                            &format!("{};tag={tag}", h.value()),
                        ));
                    }
                    _ => headers.push(h.clone()),
                },
                HeaderName::Timestamp if code == 100 => headers.push(h.clone()),
                _ => {}
            }
        }
        Message {
            start: StartLine::Response {
                code,
                reason: reason_b,
            },
            start_raw: raw,
            headers,
            body: Bytes::new(),
            wire: None,
        }
    }

    /// Builds a response that establishes a dialog (a 1xx with a To tag or
    /// a 2xx to a dialog-creating request): [`Message::response`] plus every
    /// Record-Route of the request, in order (RFC 3261 §12.1.1), so the
    /// caller's later requests pass the proxies that asked to stay.
    pub fn dialog_response(&self, code: u16, reason: &str, to_tag: Option<&str>) -> Message {
        let mut r = self.response(code, reason, to_tag);
        r.headers.extend(
            self.headers
                .iter()
                .filter(|h| h.name == HeaderName::RecordRoute)
                .cloned(),
        );
        r
    }

    /// Appends a header (builder style).
    pub fn with(mut self, name: HeaderName, value: &str) -> Message {
        self.push(Header::new(name, value));
        self
    }

    /// Appends a header with any name (builder style).
    pub fn with_named(mut self, name: &str, value: &str) -> Message {
        self.push(Header::named(name, value));
        self
    }

    /// Sets the body and its Content-Type (builder style).
    pub fn with_body(mut self, content_type: &str, body: impl Into<Bytes>) -> Message {
        self.set_body(Some(content_type), body.into());
        self
    }

    // ---- start line ----

    /// The start line.
    pub fn start_line(&self) -> &StartLine {
        &self.start
    }

    /// True for requests.
    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }

    /// The request method, or for a response the CSeq method.
    pub fn method(&self) -> Option<Method> {
        match &self.start {
            StartLine::Request { method, .. } => Some(method.clone()),
            StartLine::Response { .. } => self.cseq().ok().map(|c| c.method),
        }
    }

    /// True when this is a request with `method`, or a response to one.
    pub fn is_method(&self, m: &Method) -> bool {
        match &self.start {
            StartLine::Request { method, .. } => method == m,
            StartLine::Response { .. } => self.cseq().is_ok_and(|c| c.method == *m),
        }
    }

    /// The Request-URI text of a request.
    pub fn request_uri_str(&self) -> Option<&str> {
        match &self.start {
            StartLine::Request { uri, .. } => std::str::from_utf8(uri).ok(),
            StartLine::Response { .. } => None,
        }
    }

    /// The parsed Request-URI of a request.
    pub fn request_uri(&self) -> Option<Uri<'_>> {
        Uri::parse(self.request_uri_str()?).ok()
    }

    /// The status code of a response.
    pub fn status(&self) -> Option<u16> {
        match &self.start {
            StartLine::Response { code, .. } => Some(*code),
            StartLine::Request { .. } => None,
        }
    }

    /// The reason phrase of a response.
    pub fn reason(&self) -> Option<&str> {
        match &self.start {
            StartLine::Response { reason, .. } => std::str::from_utf8(reason).ok(),
            StartLine::Request { .. } => None,
        }
    }

    /// Replaces the Request-URI of a request.
    pub fn set_request_uri(&mut self, uri: &str) {
        if let StartLine::Request { method, .. } = &self.start {
            let method = method.clone();
            *self = Message {
                headers: std::mem::take(&mut self.headers),
                body: std::mem::take(&mut self.body),
                ..Message::request(method, uri)
            };
        }
    }

    // ---- headers ----

    /// All header lines in order.
    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    /// The value of the first header called `name`.
    pub fn header(&self, name: HeaderName) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.name == name)
            .map(Header::value)
    }

    /// The value of the first header with this name as written (any name).
    pub fn header_named(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|h| h.is(name)).map(Header::value)
    }

    /// Every value of `name`, list headers split into their elements.
    pub fn values(&self, name: HeaderName) -> impl Iterator<Item = &str> {
        let split = name.is_list();
        self.headers
            .iter()
            .filter(move |h| h.name == name)
            .flat_map(move |h| {
                let v = h.value();
                let (list, single) = if split {
                    (Some(scan::split_list(v)), None)
                } else {
                    (None, Some(v))
                };
                list.into_iter().flatten().chain(single)
            })
    }

    /// The Call-ID.
    pub fn call_id(&self) -> Option<&str> {
        self.header(HeaderName::CallId)
    }

    /// The parsed CSeq.
    pub fn cseq(&self) -> Result<CSeq, ParseError> {
        let v = self
            .header(HeaderName::CSeq)
            .ok_or(ParseError::Missing(HeaderName::CSeq))?;
        CSeq::parse(v).map_err(|e| ParseError::Header(HeaderName::CSeq, e))
    }

    /// The parsed From.
    pub fn from(&self) -> Result<NameAddr<'_>, ParseError> {
        self.name_addr(HeaderName::From)
    }

    /// The parsed To.
    pub fn to(&self) -> Result<NameAddr<'_>, ParseError> {
        self.name_addr(HeaderName::To)
    }

    fn name_addr(&self, name: HeaderName) -> Result<NameAddr<'_>, ParseError> {
        let v = self.header(name).ok_or(ParseError::Missing(name))?;
        NameAddr::parse(v).map_err(|e| ParseError::Header(name, e))
    }

    /// The topmost Via value.
    pub fn top_via(&self) -> Result<Via<'_>, ParseError> {
        let v = self
            .values(HeaderName::Via)
            .next()
            .ok_or(ParseError::Missing(HeaderName::Via))?;
        Via::parse(v).map_err(|e| ParseError::Header(HeaderName::Via, e))
    }

    /// Every Via value, top first.
    pub fn vias(&self) -> impl Iterator<Item = Result<Via<'_>, HeaderError>> {
        self.values(HeaderName::Via).map(Via::parse)
    }

    /// The Contact header: `*` or the list of addresses.
    pub fn contacts(&self) -> Result<Contacts<'_>, ParseError> {
        let mut list = Vec::new();
        for v in self.values(HeaderName::Contact) {
            if v == "*" {
                if !list.is_empty() || self.values(HeaderName::Contact).count() > 1 {
                    return Err(ParseError::Header(HeaderName::Contact, HeaderError::Syntax));
                }
                return Ok(Contacts::Star);
            }
            list.push(NameAddr::parse(v).map_err(|e| ParseError::Header(HeaderName::Contact, e))?);
        }
        Ok(Contacts::List(list))
    }

    /// Route-like headers (Route, Record-Route, Path) in order.
    pub fn name_addrs(&self, name: HeaderName) -> Result<Vec<NameAddr<'_>>, ParseError> {
        self.values(name)
            .map(|v| NameAddr::parse(v).map_err(|e| ParseError::Header(name, e)))
            .collect()
    }

    /// Max-Forwards, when present and valid.
    pub fn max_forwards(&self) -> Option<u8> {
        self.header(HeaderName::MaxForwards)
            .and_then(|v| parse_bounded(v, 255).ok())
            .map(|n| n as u8)
    }

    /// The Expires header in seconds (saturating), when present and valid.
    pub fn expires(&self) -> Option<u32> {
        self.header(HeaderName::Expires)
            .and_then(|v| parse_delta_seconds(v).ok())
    }

    /// Appends a header line.
    pub fn push(&mut self, h: Header) {
        self.wire = None;
        self.headers.push(h);
    }

    /// Inserts a header line at `index` (0 = first).
    pub fn insert(&mut self, index: usize, h: Header) {
        self.wire = None;
        let i = index.min(self.headers.len());
        self.headers.insert(i, h);
    }

    /// Inserts a header before the first existing header called `h.name()`,
    /// or first when there is none (for Via, Record-Route and Route, whose
    /// topmost value comes first).
    pub fn push_front(&mut self, h: Header) {
        let i = self
            .headers
            .iter()
            .position(|x| x.name == h.name)
            .unwrap_or(0);
        self.insert(i, h);
    }

    /// Removes every header called `name`; returns how many lines went.
    pub fn remove(&mut self, name: HeaderName) -> usize {
        let before = self.headers.len();
        self.headers.retain(|h| h.name != name);
        let n = before - self.headers.len();
        if n > 0 {
            self.wire = None;
        }
        n
    }

    /// Replaces the first header called `name` (removing the other lines of
    /// that name), or appends it.
    pub fn set(&mut self, name: HeaderName, value: &str) {
        let new = Header::new(name, value);
        match self.headers.iter().position(|h| h.name == name) {
            Some(i) => {
                self.headers[i] = new;
                let mut seen = false;
                self.headers.retain(|h| {
                    if h.name != name {
                        return true;
                    }
                    let keep = !seen;
                    seen = true;
                    keep
                });
            }
            None => self.headers.push(new),
        }
        self.wire = None;
    }

    /// Removes the topmost value of the list header `name` (Via or Route):
    /// the first element of the first line, rewriting that line if it held
    /// several. Returns false when there was none.
    pub fn pop_front_value(&mut self, name: HeaderName) -> bool {
        // Lines of `name` without any element hold no topmost value.
        let Some(i) = self
            .headers
            .iter()
            .position(|h| h.name == name && scan::split_list(h.value()).next().is_some())
        else {
            return false;
        };
        let rest: Vec<&str> = scan::split_list(self.headers[i].value()).skip(1).collect();
        if rest.is_empty() {
            self.headers.remove(i);
        } else {
            let joined = rest.join(", ");
            self.headers[i] = Header::new(name, &joined);
        }
        self.wire = None;
        true
    }

    /// Decrements Max-Forwards (setting 70 when absent). Returns false when it
    /// was already 0 (the caller answers 483, RFC 3261 §16.3).
    pub fn decrement_max_forwards(&mut self) -> bool {
        match self.max_forwards() {
            Some(0) => false,
            Some(n) => {
                self.set(HeaderName::MaxForwards, &(n - 1).to_string());
                true
            }
            None => {
                self.set(HeaderName::MaxForwards, "70");
                true
            }
        }
    }

    // ---- body ----

    /// The body (exactly Content-Length octets).
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Replaces the body, setting Content-Length and (if given) Content-Type.
    pub fn set_body(&mut self, content_type: Option<&str>, body: Bytes) {
        if let Some(ct) = content_type {
            self.set(HeaderName::ContentType, ct);
        } else if body.is_empty() {
            self.remove(HeaderName::ContentType);
        }
        self.set(HeaderName::ContentLength, &body.len().to_string());
        self.body = body;
        self.wire = None;
    }

    // ---- serialization ----

    /// The message on the wire. Unmodified parsed messages return their
    /// original bytes without copying. A Content-Length header is added when
    /// missing so the result can be framed on a stream.
    pub fn to_bytes(&self) -> Bytes {
        if let Some(w) = &self.wire {
            return w.clone();
        }
        let mut out = BytesMut::with_capacity(self.encoded_len_estimate());
        self.write(&mut out);
        out.freeze()
    }

    /// Writes the message into `out` (see [`Message::to_bytes`]).
    pub fn write(&self, out: &mut BytesMut) {
        if let Some(w) = &self.wire {
            out.put_slice(w);
            return;
        }
        out.put_slice(&self.start_raw);
        out.put_slice(b"\r\n");
        let mut has_cl = false;
        for h in &self.headers {
            has_cl |= h.name == HeaderName::ContentLength;
            out.put_slice(&h.line);
            out.put_slice(b"\r\n");
        }
        if !has_cl {
            out.put_slice(b"Content-Length: ");
            out.put_slice(self.body.len().to_string().as_bytes());
            out.put_slice(b"\r\n");
        }
        out.put_slice(b"\r\n");
        out.put_slice(&self.body);
    }

    fn encoded_len_estimate(&self) -> usize {
        self.start_raw.len()
            + self.headers.iter().map(|h| h.line.len() + 2).sum::<usize>()
            + self.body.len()
            + 32
    }
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.to_bytes()))
    }
}

/// Sets the value of the last header from its whole folded line `whole`
/// (name, colon and folds included).
fn unfold_last(headers: &mut [Header], whole: &str) {
    if let (Some(prev), Some(colon)) = (headers.last_mut(), whole.find(':')) {
        prev.value = Bytes::from(unfold(&whole[colon + 1..]));
    }
}

fn unfold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, part) in s.split("\r\n").enumerate() {
        let part = scan::trim_ws(part);
        if part.is_empty() {
            continue;
        }
        if i > 0 && !out.is_empty() {
            out.push(' ');
        }
        out.push_str(part);
    }
    out
}

fn parse_start_line(buf: &Bytes, line: &str) -> Result<StartLine, ParseError> {
    if let Some(rest) = strip_prefix_ci(line, "SIP/") {
        // Status-Line = SIP-Version SP Status-Code SP Reason-Phrase
        let (ver, rest) = rest.split_once(' ').ok_or(ParseError::StartLine)?;
        if ver != "2.0" {
            return Err(ParseError::Version);
        }
        let (code, reason) = match rest.split_once(' ') {
            Some((c, r)) => (c, r),
            None => (rest, ""),
        };
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseError::StatusCode);
        }
        let code: u16 = code.parse().map_err(|_| ParseError::StatusCode)?;
        if !(100..=699).contains(&code) {
            return Err(ParseError::StatusCode);
        }
        let off = line.len() - reason.len();
        return Ok(StartLine::Response {
            code,
            reason: buf.slice(off..line.len()),
        });
    }
    // Request-Line = Method SP Request-URI SP SIP-Version: exactly one SP each.
    let mut parts = line.split(' ');
    let (Some(method), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ParseError::StartLine);
    };
    if !scan::is_token(method) {
        return Err(ParseError::Method);
    }
    match strip_prefix_ci(version, "SIP/") {
        Some("2.0") => {}
        Some(v)
            if v.split_once('.').is_some_and(|(a, b)| {
                !a.is_empty()
                    && !b.is_empty()
                    && a.bytes().all(|c| c.is_ascii_digit())
                    && b.bytes().all(|c| c.is_ascii_digit())
            }) =>
        {
            return Err(ParseError::Version);
        }
        _ => return Err(ParseError::StartLine),
    }
    match Uri::parse(uri) {
        Ok(Uri::Sip(u)) if u.headers.is_some() => return Err(ParseError::RequestUriHeaders),
        Ok(_) => {}
        Err(e) => return Err(ParseError::RequestUri(e)),
    }
    let off = method.len() + 1;
    Ok(StartLine::Request {
        method: Method::from_token(method),
        uri: buf.slice(off..off + uri.len()),
    })
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len()
        && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

/// Builds the error response for a request that failed to parse, copying
/// Via, From, To, Call-ID and CSeq as written (RFC 3261 §8.2.6.1). Returns
/// `None` for anything that is not recognisably a request with a Via: such
/// input is dropped (responses are never answered).
pub fn error_response(input: &[u8], err: &ParseError) -> Option<Message> {
    let lead = input
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    let input = &input[lead..];
    let hdr_end = find_crlfcrlf(input).unwrap_or(input.len());
    let head = String::from_utf8_lossy(&input[..hdr_end]);
    let first = head.split("\r\n").next()?;
    if strip_prefix_ci(first, "SIP/").is_some() || !first.contains(' ') {
        return None;
    }
    let (code, reason) = err.status();
    let raw = Bytes::from(format!("SIP/2.0 {code} {reason}"));
    let mut resp = Message {
        start: StartLine::Response {
            code,
            reason: raw.slice(12..),
        },
        start_raw: raw,
        headers: Vec::new(),
        body: Bytes::new(),
        wire: None,
    };
    let mut has_via = false;
    for (name, value) in header_lines(&head) {
        let hn = HeaderName::from_wire(name);
        match hn {
            HeaderName::Via => {
                has_via = true;
                resp.headers.push(Header::new(hn, &value));
            }
            // Only the first of the headers that may appear once (RFC 4475
            // multi01 repeats them): one dialog, one transaction.
            HeaderName::From | HeaderName::CallId | HeaderName::CSeq
                if resp.header(hn).is_none() =>
            {
                resp.headers.push(Header::new(hn, &value));
            }
            HeaderName::To if resp.header(hn).is_none() => {
                // RFC 3261 §8.2.6.2: a To tag on every final response. It is
                // derived from the request so a retransmission gets the same.
                let value = if value.to_ascii_lowercase().contains(";tag=") {
                    value
                } else {
                    format!("{value};tag={:016x}", fnv1a(input))
                };
                resp.headers.push(Header::new(hn, &value));
            }
            _ => {}
        }
    }
    has_via.then_some(resp)
}

/// FNV-1a, 64 bit: a stable fingerprint (not a secret).
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &str = "INVITE sip:bob@biloxi.example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds, SIP/2.0/UDP p2.example.com;branch=z9hG4bKx\r\n\
Max-Forwards: 70\r\n\
To: Bob <sip:bob@biloxi.example.com>\r\n\
From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:alice@pc33.atlanta.example.com>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\
\r\n\
v=0\r\n";

    fn parse(s: &str) -> Result<Message, ParseError> {
        Message::parse(
            Bytes::copy_from_slice(s.as_bytes()),
            Framing::Datagram,
            &Limits::default(),
        )
    }

    #[test]
    fn parses_and_reproduces() {
        let m = parse(INVITE).unwrap();
        assert!(m.is_request());
        assert_eq!(m.method(), Some(Method::Invite));
        assert_eq!(m.request_uri_str(), Some("sip:bob@biloxi.example.com"));
        assert_eq!(m.values(HeaderName::Via).count(), 2);
        assert_eq!(m.top_via().unwrap().branch(), Some("z9hG4bK776asdhds"));
        assert_eq!(m.cseq().unwrap().seq, 314159);
        assert_eq!(m.from().unwrap().tag(), Some("1928301774"));
        assert_eq!(m.body().as_ref(), b"v=0\r");
        // trailing octets past Content-Length are dropped from the wire form
        assert_eq!(
            m.to_bytes().as_ref(),
            &INVITE.as_bytes()[..INVITE.len() - 1]
        );
    }

    #[test]
    fn modified_message_serializes_and_reparses() {
        let mut m = parse(INVITE).unwrap();
        m.push_front(Header::new(
            HeaderName::Via,
            "SIP/2.0/TCP proxy.example.com;branch=z9hG4bKnew",
        ));
        assert!(m.decrement_max_forwards());
        m.set_request_uri("sip:bob@192.0.2.4:5060");
        let again = parse(std::str::from_utf8(&m.to_bytes()).unwrap()).unwrap();
        assert_eq!(again.top_via().unwrap().branch(), Some("z9hG4bKnew"));
        assert_eq!(again.max_forwards(), Some(69));
        assert_eq!(again.request_uri_str(), Some("sip:bob@192.0.2.4:5060"));
        assert_eq!(again.values(HeaderName::Via).count(), 3);
        let mut again = again;
        assert!(again.pop_front_value(HeaderName::Via));
        assert!(again.pop_front_value(HeaderName::Via));
        assert_eq!(again.top_via().unwrap().branch(), Some("z9hG4bKx"));
        assert_eq!(again.body(), m.body());
    }

    #[test]
    fn empty_via_line_is_malformed() {
        let bad = INVITE.replace("Max-Forwards: 70", "Via:\r\nMax-Forwards: 70");
        assert_eq!(
            parse(&bad).unwrap_err(),
            ParseError::Header(HeaderName::Via, HeaderError::Syntax)
        );
    }

    #[test]
    fn many_folds_unfold_once() {
        // Unfolding per fold line was quadratic: a 64 KB datagram of
        // single-space folds took seconds to parse. The cost is measured by
        // the parse benchmark, not here (no timing in tests); this checks
        // the result of unfolding once.
        let mut s = INVITE.replace("Max-Forwards: 70\r\n", "Max-Forwards: 70\r\nX: a\r\n");
        let at = s.find("X: a\r\n").unwrap() + "X: a\r\n".len();
        let folds = " b\r\n".repeat(15_000);
        s.insert_str(at, &folds);
        let m = parse(&s).unwrap();
        let x = m.headers().iter().find(|h| h.name_str() == "X").unwrap();
        assert_eq!(x.value().len(), 1 + 2 * 15_000);
        assert!(x.value().starts_with("a b b"));
        assert_eq!(x.line().len(), "X: a\r\n".len() + folds.len() - 2);
        assert_eq!(m.max_forwards(), Some(70));
        assert_eq!(
            m.header(HeaderName::To),
            Some("Bob <sip:bob@biloxi.example.com>")
        );
    }

    #[test]
    fn response_building() {
        let m = parse(INVITE).unwrap();
        let r = m.response(180, "Ringing", Some("abc"));
        assert_eq!(r.status(), Some(180));
        assert_eq!(r.to().unwrap().tag(), Some("abc"));
        assert_eq!(r.values(HeaderName::Via).count(), 2);
        let back = parse(std::str::from_utf8(&r.to_bytes()).unwrap()).unwrap();
        assert_eq!(back.reason(), Some("Ringing"));
        assert_eq!(back.cseq().unwrap().method, Method::Invite);
    }

    #[test]
    fn stream_framing() {
        let l = Limits::default();
        let b = INVITE.as_bytes();
        assert_eq!(frame(&b[..20], &l), Ok(Frame::Incomplete));
        assert_eq!(frame(&b[..b.len() - 3], &l), Ok(Frame::Incomplete));
        assert_eq!(frame(b, &l), Ok(Frame::Message(b.len() - 1)));
        assert_eq!(frame(b"\r\n\r\n", &l), Ok(Frame::Ping(4)));
        assert_eq!(frame(b"\r\nINV", &l), Ok(Frame::Pong(2)));
        let no_cl = "OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/TCP h\r\n\r\n";
        assert_eq!(
            frame(no_cl.as_bytes(), &l),
            Err(ParseError::NoContentLength)
        );
        let huge = INVITE.replace("Content-Length: 4", "Content-Length: 10000000");
        assert_eq!(frame(huge.as_bytes(), &l), Err(ParseError::TooLarge));
        let mut big = b"OPTIONS sip:x SIP/2.0\r\nX: ".to_vec();
        big.resize(70_000, b'a');
        assert_eq!(frame(&big, &l), Err(ParseError::TooLarge));
    }

    #[test]
    fn error_responses() {
        let bad = INVITE.replace("CSeq: 314159 INVITE", "CSeq: 314159 OPTIONS");
        let err = parse(&bad).unwrap_err();
        assert_eq!(err, ParseError::CSeqMismatch);
        let r = error_response(bad.as_bytes(), &err).unwrap();
        assert_eq!(r.status(), Some(400));
        assert!(r.top_via().is_ok());
        let tag = r.to().unwrap().tag().unwrap().to_string();
        assert_eq!(
            error_response(bad.as_bytes(), &err)
                .unwrap()
                .to()
                .unwrap()
                .tag(),
            Some(tag.as_str()),
            "a retransmission gets the same tag"
        );
        // repeated single headers: only the first of each is echoed
        let multi = bad.replace("Call-ID: a84b", "Call-ID: other\r\nCall-ID: a84b");
        let r = error_response(multi.as_bytes(), &err).unwrap();
        assert_eq!(
            r.headers()
                .iter()
                .filter(|h| h.name() == HeaderName::CallId)
                .count(),
            1
        );
        assert_eq!(r.call_id(), Some("other"));
        let v = INVITE.replace("SIP/2.0\r\nVia", "SIP/7.0\r\nVia");
        let err = parse(&v).unwrap_err();
        assert_eq!(err.status().0, 505);
        assert!(error_response(b"SIP/2.0 200 OK\r\n\r\n", &err).is_none());
        assert!(error_response(b"garbage", &err).is_none());
    }

    #[test]
    fn every_prefix_and_corruption_is_safe() {
        let b = INVITE.as_bytes();
        for i in 0..b.len() {
            let _ = Message::parse(
                Bytes::copy_from_slice(&b[..i]),
                Framing::Datagram,
                &Limits::default(),
            );
            let _ = frame(&b[..i], &Limits::default());
            let mut c = b.to_vec();
            c[i] = b'\n';
            let _ = Message::parse(
                Bytes::from(c.clone()),
                Framing::Datagram,
                &Limits::default(),
            );
            c[i] = b':';
            let _ = Message::parse(Bytes::from(c), Framing::Stream, &Limits::default());
        }
    }
}
