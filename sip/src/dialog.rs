//! Dialog state (RFC 3261 §12): the identifiers, sequence numbers, remote
//! target and route set that in-dialog requests are built from, on the UAC
//! side (§12.1.2) and the UAS side (§12.1.1).
//!
//! A dialog is plain data: it can be stored, replicated and continued by
//! another element, which is how a call outlives the node that set it up.

use super::msg::{Header, HeaderName, Message, Method, NameAddr, Uri};

/// Why a dialog could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialogError {
    /// A header the dialog is built from is missing or malformed.
    #[error("missing or malformed {0}")]
    Header(HeaderName),
    /// The response carries no To tag, so it creates no dialog.
    #[error("response has no To tag")]
    NoRemoteTag,
    /// There is no Contact to use as the remote target.
    #[error("no Contact for the remote target")]
    NoContact,
}

/// The identifiers of a dialog (RFC 3261 §12: Call-ID, local tag, remote tag).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DialogId {
    /// The Call-ID.
    pub call_id: String,
    /// Our tag.
    pub local_tag: String,
    /// The peer's tag (empty for an RFC 2543 peer without tags).
    pub remote_tag: String,
}

/// One side of a dialog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dialog {
    /// Call-ID and tags.
    pub id: DialogId,
    /// Our address as it goes in From of our requests (tag included).
    pub local: String,
    /// The peer's address as it goes in To of our requests (tag included).
    pub remote: String,
    /// The CSeq number of our last request.
    pub local_seq: u32,
    /// The CSeq number of the peer's last request, once one was seen.
    pub remote_seq: Option<u32>,
    /// The peer's Contact URI: the Request-URI of our requests.
    pub remote_target: String,
    /// Route set, in the order our requests carry it.
    pub route_set: Vec<String>,
    /// True for a SIPS dialog.
    pub secure: bool,
}

fn contact_uri(msg: &Message) -> Result<String, DialogError> {
    match msg.contacts() {
        Ok(super::msg::Contacts::List(l)) => l
            .first()
            .map(|c| c.uri_raw.to_string())
            .ok_or(DialogError::NoContact),
        _ => Err(DialogError::NoContact),
    }
}

fn routes(msg: &Message) -> Result<Vec<String>, DialogError> {
    msg.name_addrs(HeaderName::RecordRoute)
        .map(|v| v.iter().map(|n| format!("<{}>", n.uri_raw)).collect())
        .map_err(|_| DialogError::Header(HeaderName::RecordRoute))
}

fn header(msg: &Message, name: HeaderName) -> Result<&str, DialogError> {
    msg.header(name).ok_or(DialogError::Header(name))
}

impl Dialog {
    /// The UAC side, from the request we sent and a response with a To tag
    /// (2xx, or 101–199 for an early dialog).
    pub fn uac(req: &Message, resp: &Message) -> Result<Dialog, DialogError> {
        let from = req
            .from()
            .map_err(|_| DialogError::Header(HeaderName::From))?;
        let to = resp.to().map_err(|_| DialogError::Header(HeaderName::To))?;
        let remote_tag = to.tag().ok_or(DialogError::NoRemoteTag)?.to_string();
        let mut route_set = routes(resp)?;
        route_set.reverse();
        Ok(Dialog {
            id: DialogId {
                call_id: header(req, HeaderName::CallId)?.to_string(),
                local_tag: from.tag().unwrap_or_default().to_string(),
                remote_tag,
            },
            local: header(req, HeaderName::From)?.to_string(),
            remote: header(resp, HeaderName::To)?.to_string(),
            local_seq: req
                .cseq()
                .map_err(|_| DialogError::Header(HeaderName::CSeq))?
                .seq,
            remote_seq: None,
            remote_target: contact_uri(resp)?,
            route_set,
            secure: is_sips(req),
        })
    }

    /// The UAS side, from the request we received and the tag we chose.
    pub fn uas(req: &Message, local_tag: &str) -> Result<Dialog, DialogError> {
        let from = req
            .from()
            .map_err(|_| DialogError::Header(HeaderName::From))?;
        let to_value = header(req, HeaderName::To)?;
        let to: NameAddr<'_> = req.to().map_err(|_| DialogError::Header(HeaderName::To))?;
        let local = match to.tag() {
            Some(_) => to_value.to_string(),
            None => format!("{to_value};tag={local_tag}"),
        };
        Ok(Dialog {
            id: DialogId {
                call_id: header(req, HeaderName::CallId)?.to_string(),
                local_tag: to.tag().unwrap_or(local_tag).to_string(),
                remote_tag: from.tag().unwrap_or_default().to_string(),
            },
            local,
            remote: header(req, HeaderName::From)?.to_string(),
            local_seq: 0,
            remote_seq: Some(
                req.cseq()
                    .map_err(|_| DialogError::Header(HeaderName::CSeq))?
                    .seq,
            ),
            remote_target: contact_uri(req)?,
            route_set: routes(req)?,
            secure: is_sips(req),
        })
    }

    /// Builds a request inside the dialog (RFC 3261 §12.2.1.1). The CSeq
    /// number grows by one, except for ACK, which takes `ack_seq` (the
    /// INVITE's number). `via` is the full Via value, branch included.
    pub fn request(&mut self, method: Method, via: &str) -> Message {
        let seq = match method {
            Method::Ack | Method::Cancel => self.local_seq,
            _ => {
                self.local_seq = self.local_seq.wrapping_add(1).max(1);
                self.local_seq
            }
        };
        self.build(method, seq, via)
    }

    /// The ACK for a 2xx to the INVITE with CSeq number `invite_seq`
    /// (RFC 3261 §13.2.2.4).
    pub fn ack(&self, invite_seq: u32, via: &str) -> Message {
        self.build(Method::Ack, invite_seq, via)
    }

    fn build(&self, method: Method, seq: u32, via: &str) -> Message {
        // Loose routing when the first route has `lr` (§12.2.1.1); strict
        // routing puts the first route in the Request-URI instead.
        let first_lr = self.route_set.first().map(|r| {
            let inner = r.trim_start_matches('<').trim_end_matches('>');
            Uri::parse(inner)
                .ok()
                .and_then(|u| u.as_sip().map(|s| s.params.has("lr")))
                .unwrap_or(false)
        });
        let (ruri, routes): (String, Vec<String>) = match first_lr {
            Some(false) => {
                let first = self.route_set[0]
                    .trim_start_matches('<')
                    .trim_end_matches('>');
                let mut rest: Vec<String> = self.route_set[1..].to_vec();
                rest.push(format!("<{}>", self.remote_target));
                (first.to_string(), rest)
            }
            _ => (self.remote_target.clone(), self.route_set.clone()),
        };
        let mut m = Message::request(method.clone(), &ruri)
            .with(HeaderName::Via, via)
            .with(HeaderName::MaxForwards, "70");
        for r in &routes {
            m.push(Header::new(HeaderName::Route, r));
        }
        m.with(HeaderName::From, &self.local)
            .with(HeaderName::To, &self.remote)
            .with(HeaderName::CallId, &self.id.call_id)
            .with(HeaderName::CSeq, &format!("{seq} {method}"))
    }

    /// Checks and records the CSeq of a request from the peer (RFC 3261
    /// §12.2.2): false when it is lower than the last one (answer 500).
    pub fn accept_remote_seq(&mut self, seq: u32) -> bool {
        match self.remote_seq {
            Some(last) if seq < last => false,
            _ => {
                self.remote_seq = Some(seq);
                true
            }
        }
    }

    /// Updates the remote target from a target refresh (re-INVITE, UPDATE or
    /// its 2xx, RFC 3261 §12.2.1.2 and §12.2.2).
    pub fn refresh_target(&mut self, msg: &Message) {
        if let Ok(uri) = contact_uri(msg) {
            self.remote_target = uri;
        }
    }
}

fn is_sips(req: &Message) -> bool {
    req.request_uri()
        .and_then(|u| u.as_sip().map(|s| s.secure))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{Framing, Limits};
    use bytes::Bytes;

    fn parse(s: &str) -> Message {
        Message::parse(
            Bytes::from(s.replace('\n', "\r\n")),
            Framing::Datagram,
            &Limits::default(),
        )
        .unwrap()
    }

    const INVITE: &str = "INVITE sip:bob@b.example.com SIP/2.0
Via: SIP/2.0/UDP a.example.com;branch=z9hG4bK1
Max-Forwards: 70
From: <sip:alice@a.example.com>;tag=at
To: <sip:bob@b.example.com>
Call-ID: c1
CSeq: 10 INVITE
Contact: <sip:alice@192.0.2.1:5060>
Record-Route: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>
Content-Length: 0

";

    #[test]
    fn uac_and_uas_sides_agree() {
        let inv = parse(INVITE);
        let mut uas = Dialog::uas(&inv, "bt").unwrap();
        assert_eq!(
            uas.route_set,
            vec!["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]
        );
        let mut ok = inv.response(200, "OK", Some("bt"));
        ok.push(Header::new(
            HeaderName::RecordRoute,
            "<sip:p1.example.com;lr>, <sip:p2.example.com;lr>",
        ));
        ok.push(Header::new(HeaderName::Contact, "<sip:bob@192.0.2.2:5070>"));
        let ok = parse(&String::from_utf8_lossy(&ok.to_bytes()).replace("\r\n", "\n"));
        let mut uac = Dialog::uac(&inv, &ok).unwrap();
        assert_eq!(uac.id.remote_tag, "bt");
        assert_eq!(uas.id.local_tag, "bt");
        assert_eq!(
            uac.route_set,
            vec!["<sip:p2.example.com;lr>", "<sip:p1.example.com;lr>"]
        );

        let ack = uac.ack(10, "SIP/2.0/UDP a.example.com;branch=z9hG4bK2");
        assert_eq!(ack.cseq().unwrap().seq, 10);
        assert_eq!(ack.request_uri_str(), Some("sip:bob@192.0.2.2:5070"));
        let bye = uac.request(Method::Bye, "SIP/2.0/UDP a.example.com;branch=z9hG4bK3");
        assert_eq!(bye.cseq().unwrap().seq, 11);
        assert_eq!(bye.to().unwrap().tag(), Some("bt"));
        assert_eq!(bye.from().unwrap().tag(), Some("at"));
        assert_eq!(
            bye.values(HeaderName::Route).next(),
            Some("<sip:p2.example.com;lr>")
        );
        let bye = parse(&String::from_utf8_lossy(&bye.to_bytes()).replace("\r\n", "\n"));
        assert!(uas.accept_remote_seq(bye.cseq().unwrap().seq));
        assert!(!uas.accept_remote_seq(5));
        let uas_bye = uas.request(Method::Bye, "SIP/2.0/UDP b.example.com;branch=z9hG4bK4");
        assert_eq!(uas_bye.request_uri_str(), Some("sip:alice@192.0.2.1:5060"));
        assert_eq!(uas_bye.cseq().unwrap().seq, 1);
    }

    #[test]
    fn strict_route_goes_into_request_uri() {
        let inv = parse(&INVITE.replace(
            "Record-Route: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>",
            "Record-Route: <sip:p1.example.com>",
        ));
        let mut uas = Dialog::uas(&inv, "bt").unwrap();
        let bye = uas.request(Method::Bye, "SIP/2.0/UDP b;branch=z9hG4bK5");
        assert_eq!(bye.request_uri_str(), Some("sip:p1.example.com"));
        assert_eq!(
            bye.values(HeaderName::Route).last(),
            Some("<sip:alice@192.0.2.1:5060>")
        );
    }

    #[test]
    fn response_without_tag_makes_no_dialog() {
        let inv = parse(INVITE);
        let r = inv
            .response(200, "OK", None)
            .with(HeaderName::Contact, "<sip:b@h>");
        assert_eq!(Dialog::uac(&inv, &r), Err(DialogError::NoRemoteTag));
    }
}
