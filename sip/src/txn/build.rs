//! Requests the transaction layer derives from an INVITE: the hop-by-hop ACK
//! for a non-2xx final response (RFC 3261 §17.1.1.3) and CANCEL (§9.1).

use crate::msg::{HeaderName, Message, Method, ParseError};

use super::TxnError;

/// Builds the ACK a client INVITE transaction sends for a non-2xx final
/// `response` (§17.1.1.3): the INVITE's Request-URI, Call-ID and From, the
/// response's To (with its tag), CSeq number with method ACK, the INVITE's
/// top Via only (same branch) and its Route headers.
pub fn build_ack(invite: &Message, response: &Message) -> Result<Message, TxnError> {
    check_invite(invite)?;
    let to = response
        .header(HeaderName::To)
        .ok_or(missing(HeaderName::To))?;
    derived(invite, Method::Ack, to)
}

/// Builds a CANCEL for a client INVITE (§9.1): the INVITE's Request-URI,
/// Call-ID, To, From, CSeq number with method CANCEL, its top Via only (so
/// the CANCEL carries the INVITE's branch and reaches the same hop) and its
/// Route headers.
///
/// The CANCEL must not be sent before a provisional response arrived for the
/// INVITE (§9.1); [`super::TxnTable::cancel`] enforces that.
pub fn build_cancel(invite: &Message) -> Result<Message, TxnError> {
    check_invite(invite)?;
    let to = invite
        .header(HeaderName::To)
        .ok_or(missing(HeaderName::To))?;
    derived(invite, Method::Cancel, to)
}

fn missing(h: HeaderName) -> TxnError {
    TxnError::Malformed(ParseError::Missing(h))
}

fn check_invite(invite: &Message) -> Result<(), TxnError> {
    if invite.is_request() && invite.is_method(&Method::Invite) {
        Ok(())
    } else {
        Err(TxnError::NotInvite)
    }
}

fn derived(invite: &Message, method: Method, to: &str) -> Result<Message, TxnError> {
    let uri = invite.request_uri_str().ok_or(TxnError::NotRequest)?;
    let via = invite
        .values(HeaderName::Via)
        .next()
        .ok_or(missing(HeaderName::Via))?;
    let from = invite
        .header(HeaderName::From)
        .ok_or(missing(HeaderName::From))?;
    let call_id = invite.call_id().ok_or(missing(HeaderName::CallId))?;
    let seq = invite.cseq()?.seq;
    let mut m = Message::request(method.clone(), uri)
        .with(HeaderName::Via, via)
        .with(HeaderName::MaxForwards, "70")
        .with(HeaderName::From, from)
        .with(HeaderName::To, to)
        .with(HeaderName::CallId, call_id)
        .with(HeaderName::CSeq, &format!("{seq} {method}"));
    for route in invite.values(HeaderName::Route) {
        m = m.with(HeaderName::Route, route);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{Framing, Limits};
    use bytes::Bytes;

    const INVITE: &str = "INVITE sip:bob@b.example SIP/2.0\r\n\
Via: SIP/2.0/UDP a.example;branch=z9hG4bKabc, SIP/2.0/UDP b.example;branch=z9hG4bKdef\r\n\
Route: <sip:p1.example;lr>, <sip:p2.example;lr>\r\n\
From: <sip:a@a.example>;tag=1\r\n\
To: <sip:bob@b.example>\r\n\
Call-ID: c1\r\n\
CSeq: 7 INVITE\r\n\
Max-Forwards: 70\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 3\r\n\r\nv=0";

    fn invite() -> Message {
        Message::parse(
            Bytes::from_static(INVITE.as_bytes()),
            Framing::Datagram,
            &Limits::default(),
        )
        .unwrap()
    }

    fn reparse(m: &Message) -> Message {
        Message::parse(m.to_bytes(), Framing::Datagram, &Limits::default()).unwrap()
    }

    #[test]
    fn ack_for_non_2xx() {
        let inv = invite();
        let resp = inv.response(486, "Busy Here", Some("xyz"));
        let ack = reparse(&build_ack(&inv, &resp).unwrap());
        assert_eq!(ack.method(), Some(Method::Ack));
        assert_eq!(ack.request_uri_str(), Some("sip:bob@b.example"));
        assert_eq!(ack.values(HeaderName::Via).count(), 1);
        assert_eq!(ack.top_via().unwrap().branch(), Some("z9hG4bKabc"));
        assert_eq!(ack.to().unwrap().tag(), Some("xyz"));
        assert_eq!(ack.from().unwrap().tag(), Some("1"));
        assert_eq!(ack.call_id(), Some("c1"));
        assert_eq!(ack.header(HeaderName::CSeq), Some("7 ACK"));
        let routes: Vec<_> = ack.values(HeaderName::Route).collect();
        assert_eq!(routes, ["<sip:p1.example;lr>", "<sip:p2.example;lr>"]);
        assert!(ack.body().is_empty());
    }

    #[test]
    fn cancel_for_invite() {
        let inv = invite();
        let c = reparse(&build_cancel(&inv).unwrap());
        assert_eq!(c.method(), Some(Method::Cancel));
        assert_eq!(c.header(HeaderName::CSeq), Some("7 CANCEL"));
        assert_eq!(c.to().unwrap().tag(), None);
        assert_eq!(c.values(HeaderName::Via).count(), 1);
        assert_eq!(c.top_via().unwrap().branch(), Some("z9hG4bKabc"));
        assert_eq!(c.values(HeaderName::Route).count(), 2);
        let bye = Message::request(Method::Bye, "sip:x@y");
        assert_eq!(build_cancel(&bye).unwrap_err(), TxnError::NotInvite);
    }
}
