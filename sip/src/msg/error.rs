//! Parse errors and the SIP response each one maps to at the edge.

use super::header::{HeaderError, HeaderName};

/// Why a message could not be parsed or failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The input is empty or only CRLFs.
    #[error("empty message")]
    Empty,
    /// The header section is not valid UTF-8.
    #[error("header section is not UTF-8")]
    NotUtf8,
    /// The start line is neither a Request-Line nor a Status-Line.
    #[error("malformed start line")]
    StartLine,
    /// The method is not a token.
    #[error("malformed method")]
    Method,
    /// The Request-URI does not parse.
    #[error("malformed Request-URI: {0}")]
    RequestUri(super::uri::UriError),
    /// The Request-URI carries `?headers`, which a request line may not (RFC 3261 §19.1.5).
    #[error("Request-URI carries headers")]
    RequestUriHeaders,
    /// The SIP version is not SIP/2.0.
    #[error("unsupported SIP version")]
    Version,
    /// The status code is not three digits in 100..=699.
    #[error("malformed status code")]
    StatusCode,
    /// A header line has no colon or a name that is not a token.
    #[error("malformed header line")]
    HeaderLine,
    /// The header section does not end with an empty line.
    #[error("header section not terminated")]
    Unterminated,
    /// A mandatory header is absent.
    #[error("missing {0} header")]
    Missing(HeaderName),
    /// A header that may appear once appears more than once.
    #[error("{0} header repeated")]
    Repeated(HeaderName),
    /// A header value does not match its grammar.
    #[error("malformed {0} header: {1}")]
    Header(HeaderName, HeaderError),
    /// The CSeq method differs from the request method.
    #[error("CSeq method does not match the request method")]
    CSeqMismatch,
    /// Content-Length is absent on a stream transport.
    #[error("Content-Length required on stream transports")]
    NoContentLength,
    /// Content-Length is larger than the octets that follow the headers.
    #[error("body shorter than Content-Length")]
    ShortBody,
    /// The message is larger than the configured limit.
    #[error("message too large")]
    TooLarge,
    /// The body is larger than the configured limit.
    #[error("body too large")]
    BodyTooLarge,
    /// More header lines than the configured limit.
    #[error("too many headers")]
    TooManyHeaders,
}

impl ParseError {
    /// The response a UAS or proxy sends for a request that failed this way
    /// (RFC 3261 §8.2, §21). Responses that fail to parse are dropped instead.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            ParseError::Version => (505, "Version Not Supported"),
            ParseError::TooLarge | ParseError::TooManyHeaders => (513, "Message Too Large"),
            ParseError::BodyTooLarge => (413, "Request Entity Too Large"),
            _ => (400, "Bad Request"),
        }
    }

    /// True when the connection must be closed after this error because the
    /// stream cannot be framed any more (RFC 3261 §18.3).
    pub fn breaks_framing(&self) -> bool {
        matches!(
            self,
            ParseError::NoContentLength
                | ParseError::TooLarge
                | ParseError::BodyTooLarge
                | ParseError::Unterminated
                | ParseError::Header(HeaderName::ContentLength, _)
                | ParseError::Repeated(HeaderName::ContentLength)
        )
    }
}
