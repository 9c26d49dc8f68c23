//! The proxy hot path over `sip::msg` against rsip 0.4: parse a datagram,
//! read what a stateless proxy reads (top Via branch, CSeq, Call-ID, From and
//! To tags), push a Via and serialize.
//!
//! Three messages: an INVITE with a 250-byte SDP offer, a REGISTER with
//! digest credentials, and the 200 OK to the INVITE with an SDP answer. Both
//! sides start from the same `&[u8]` (ours copies it into `Bytes`, as a
//! transport does when it owns the receive buffer).
//!
//! `cargo bench -p sip --bench parse` runs the criterion groups, then times
//! each side itself ([`RATIO_ITERS`] iterations) and prints messages/s and
//! `ratio ours/rsip` per message. Under `--test` (CI) every case runs once,
//! after a check that both parsers read the same values.

#![allow(clippy::disallowed_methods)] // Instant::now: a bench owns its clock.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use rsip::prelude::{HasHeaders, HeadersExt, ToTypedHeader, UntypedHeader};
use sip::msg::{Framing, Header, HeaderName, Limits, Message};

/// Iterations per side for the final ratio lines.
const RATIO_ITERS: u32 = 200_000;

/// The Via a proxy pushes before forwarding.
const PROXY_VIA: &str = "SIP/2.0/UDP proxy.example.com:5060;branch=z9hG4bK4b43c2ff8.1;rport";

/// SDP offer, exactly 250 octets.
const SDP_OFFER: &str = "v=0\r\n\
o=alice 2890844526 2890844527 IN IP4 192.0.2.1\r\n\
s=-\r\n\
c=IN IP4 192.0.2.1\r\n\
t=0 0\r\n\
m=audio 49172 RTP/AVP 0 8 101\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-15\r\n\
a=ptime:20\r\n\
a=rtcp:49173\r\n\
a=sendrecv\r\n";

/// SDP answer, 246 octets.
const SDP_ANSWER: &str = "v=0\r\n\
o=bob 2890844526 2890844527 IN IP4 192.0.2.4\r\n\
s=-\r\n\
c=IN IP4 192.0.2.4\r\n\
t=0 0\r\n\
m=audio 3456 RTP/AVP 0 8 101\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-15\r\n\
a=ptime:20\r\n\
a=rtcp:3457\r\n\
a=sendrecv\r\n";

const INVITE_HEAD: &str = "INVITE sip:bob@biloxi.example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP p1.atlanta.example.com:5060;branch=z9hG4bK2d4790.1\r\n\
Via: SIP/2.0/UDP pc33.atlanta.example.com:5060;branch=z9hG4bK74bf9;received=192.0.2.1;rport=5060\r\n\
Max-Forwards: 69\r\n\
From: Alice <sip:alice@atlanta.example.com>;tag=9fxced76sl\r\n\
To: Bob <sip:bob@biloxi.example.com>;tag=8321234356\r\n\
Call-ID: 3848276298220188511@atlanta.example.com\r\n\
CSeq: 2 INVITE\r\n\
Contact: <sip:alice@pc33.atlanta.example.com:5060;transport=udp>\r\n\
Record-Route: <sip:p1.atlanta.example.com;lr>\r\n\
Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO, PRACK, REFER, NOTIFY\r\n\
Supported: replaces, timer, 100rel\r\n\
User-Agent: sipzone-bench/1.0\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 250\r\n\
\r\n";

const REGISTER: &str = "REGISTER sip:registrar.biloxi.example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP bobspc.biloxi.example.com:5060;branch=z9hG4bKnashds7;rport\r\n\
Max-Forwards: 70\r\n\
From: Bob <sip:bob@biloxi.example.com>;tag=a73kszlfl\r\n\
To: Bob <sip:bob@biloxi.example.com>\r\n\
Call-ID: 1j9FpLxk3uxtm8tn@biloxi.example.com\r\n\
CSeq: 2 REGISTER\r\n\
Contact: <sip:bob@192.0.2.4:5060>;expires=3600\r\n\
Authorization: Digest username=\"bob\", realm=\"atlanta.example.com\", \
nonce=\"ea9c8e88df84f1cec4341ae6cbe5a359\", opaque=\"\", \
uri=\"sip:registrar.biloxi.example.com\", response=\"dfe56131d1958046689d83306477ecc\", \
algorithm=MD5, qop=auth, nc=00000001, cnonce=\"0a4f113b\"\r\n\
User-Agent: sipzone-bench/1.0\r\n\
Expires: 3600\r\n\
Content-Length: 0\r\n\
\r\n";

const OK_HEAD: &str = "SIP/2.0 200 OK\r\n\
Via: SIP/2.0/UDP p1.atlanta.example.com:5060;branch=z9hG4bK2d4790.1;received=192.0.2.3\r\n\
Via: SIP/2.0/UDP pc33.atlanta.example.com:5060;branch=z9hG4bK74bf9;received=192.0.2.1;rport=5060\r\n\
Record-Route: <sip:p1.atlanta.example.com;lr>\r\n\
From: Alice <sip:alice@atlanta.example.com>;tag=9fxced76sl\r\n\
To: Bob <sip:bob@biloxi.example.com>;tag=8321234356\r\n\
Call-ID: 3848276298220188511@atlanta.example.com\r\n\
CSeq: 2 INVITE\r\n\
Contact: <sip:bob@192.0.2.4:5060>\r\n\
Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO, PRACK, REFER, NOTIFY\r\n\
Supported: replaces, timer\r\n\
User-Agent: sipzone-bench/1.0\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 246\r\n\
\r\n";

/// What the proxy path reads, owned so both sides can be compared.
#[derive(Debug, PartialEq, Eq)]
struct Fields {
    branch: Option<String>,
    cseq: u32,
    cseq_method: String,
    call_id: String,
    from_tag: Option<String>,
    to_tag: Option<String>,
}

/// Ours: parse, read, push a Via, serialize. Returns the wire length.
fn ours(raw: &[u8]) -> usize {
    let mut m = Message::parse(
        Bytes::copy_from_slice(raw),
        Framing::Datagram,
        &Limits::default(),
    )
    .unwrap();
    black_box(m.top_via().unwrap().branch());
    let cseq = m.cseq().unwrap();
    black_box((cseq.seq, &cseq.method));
    black_box(m.call_id().unwrap());
    black_box(m.from().unwrap().tag());
    black_box(m.to().unwrap().tag());
    m.push_front(Header::new(HeaderName::Via, PROXY_VIA));
    m.to_bytes().len()
}

/// rsip 0.4: the same through its typed headers, serialized with `to_string()`.
fn rsip(raw: &[u8]) -> usize {
    let mut m = rsip::SipMessage::try_from(raw).unwrap();
    black_box(m.via_header().unwrap().typed().unwrap().branch().cloned());
    let cseq = m.cseq_header().unwrap().typed().unwrap();
    black_box((cseq.seq, &cseq.method));
    black_box(m.call_id_header().unwrap().value());
    black_box(m.from_header().unwrap().tag().unwrap());
    black_box(m.to_header().unwrap().tag().unwrap());
    // rsip's Headers has no push-front: rebuild the list with the Via first.
    let old: Vec<rsip::Header> = std::mem::take(m.headers_mut()).into();
    let mut list = Vec::with_capacity(old.len() + 1);
    list.push(rsip::Header::Via(rsip::headers::Via::new(PROXY_VIA)));
    list.extend(old);
    *m.headers_mut() = list.into();
    m.to_string().len()
}

fn ours_fields(raw: &[u8]) -> Fields {
    let m = Message::parse(
        Bytes::copy_from_slice(raw),
        Framing::Datagram,
        &Limits::default(),
    )
    .unwrap();
    let cseq = m.cseq().unwrap();
    Fields {
        branch: m.top_via().unwrap().branch().map(str::to_owned),
        cseq: cseq.seq,
        cseq_method: cseq.method.to_string(),
        call_id: m.call_id().unwrap().to_owned(),
        from_tag: m.from().unwrap().tag().map(str::to_owned),
        to_tag: m.to().unwrap().tag().map(str::to_owned),
    }
}

fn rsip_fields(raw: &[u8]) -> Fields {
    let m = rsip::SipMessage::try_from(raw).unwrap();
    let cseq = m.cseq_header().unwrap().typed().unwrap();
    Fields {
        branch: m
            .via_header()
            .unwrap()
            .typed()
            .unwrap()
            .branch()
            .map(|b| b.to_string()),
        cseq: cseq.seq,
        cseq_method: cseq.method.to_string(),
        call_id: m.call_id_header().unwrap().value().to_owned(),
        from_tag: m
            .from_header()
            .unwrap()
            .tag()
            .unwrap()
            .map(|t| t.to_string()),
        to_tag: m.to_header().unwrap().tag().unwrap().map(|t| t.to_string()),
    }
}

/// Both parsers accept every message and read the same values, and both
/// serialized forms carry the pushed Via on top; run in every mode.
fn check(cases: &[(&str, Vec<u8>)]) {
    assert_eq!(SDP_OFFER.len(), 250);
    assert_eq!(SDP_ANSWER.len(), 246);
    for (name, raw) in cases {
        assert_eq!(
            ours_fields(raw),
            rsip_fields(raw),
            "{name}: parsers disagree"
        );
        assert!(ours(raw) > raw.len(), "{name}: our output lost the Via");
        assert!(rsip(raw) > raw.len(), "{name}: rsip output lost the Via");
        let m = Message::parse(
            Bytes::copy_from_slice(raw),
            Framing::Datagram,
            &Limits::default(),
        )
        .unwrap();
        let body_len = m.body().len();
        assert!(
            raw.ends_with(&m.body()[..]) && body_len + 4 <= raw.len(),
            "{name}: body framing"
        );
    }
}

fn cases() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("INVITE", format!("{INVITE_HEAD}{SDP_OFFER}").into_bytes()),
        ("REGISTER", REGISTER.as_bytes().to_vec()),
        ("200 OK", format!("{OK_HEAD}{SDP_ANSWER}").into_bytes()),
    ]
}

fn criterion_groups(c: &mut Criterion, cases: &[(&str, Vec<u8>)]) {
    for (name, raw) in cases {
        let mut g = c.benchmark_group(format!("proxy path/{name}"));
        g.throughput(Throughput::Elements(1));
        g.bench_function("ours", |b| b.iter(|| ours(black_box(raw))));
        g.bench_function("rsip 0.4", |b| b.iter(|| rsip(black_box(raw))));
        g.finish();
    }
}

/// Rounds the ratio iterations are split into, alternating the two sides so
/// that drift on a shared machine (frequency, neighbours) hits both alike.
const ROUNDS: u32 = 20;

/// Median nanoseconds per message of `ours` and `rsip` over [`ROUNDS`]
/// alternating rounds of `iters / ROUNDS` messages each, after a warm-up.
fn time_pair(iters: u32, raw: &[u8]) -> (f64, f64) {
    let chunk = (iters / ROUNDS).max(1);
    let run = |f: fn(&[u8]) -> usize| {
        let start = Instant::now();
        for _ in 0..chunk {
            black_box(f(black_box(raw)));
        }
        start.elapsed().as_nanos() as f64 / f64::from(chunk)
    };
    run(ours);
    run(rsip);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        a.push(run(ours));
        b.push(run(rsip));
    }
    (median(&mut a), median(&mut b))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ratios(cases: &[(&str, Vec<u8>)], iters: u32) {
    println!();
    println!(
        "proxy path (parse + 5 field reads + push Via + serialize), {iters} messages per side \
         in {ROUNDS} alternating rounds, median round:"
    );
    if iters < RATIO_ITERS {
        println!("(test mode: too few iterations for these figures to mean anything)");
    }
    let mut lines = Vec::new();
    for (name, raw) in cases {
        let (ns_ours, ns_rsip) = time_pair(iters, raw);
        println!(
            "{name:<9} {:>4} bytes: ours {:>7.0} msg/s ({:>5.0} ns/msg), rsip 0.4 {:>7.0} msg/s ({:>5.0} ns/msg)",
            raw.len(),
            1e9 / ns_ours,
            ns_ours,
            1e9 / ns_rsip,
            ns_rsip,
        );
        lines.push(format!("ratio ours/rsip: {name} {:.1}x", ns_rsip / ns_ours));
    }
    // The ratio lines last, one per message (throughput ours / throughput rsip).
    for l in lines {
        println!("{l}");
    }
}

fn main() {
    let cases = cases();
    check(&cases);

    let args: Vec<String> = std::env::args().collect();
    let has = |a: &str| args.iter().any(|x| x == a);
    let mut c = Criterion::default().configure_from_args();
    criterion_groups(&mut c, &cases);
    if has("--list") {
        return;
    }
    c.final_summary();

    // `cargo bench` passes --bench; `--test` and `cargo test --benches` do not
    // measure, so the ratio section runs a token number of iterations.
    let measuring = has("--bench") && !has("--test");
    ratios(&cases, if measuring { RATIO_ITERS } else { ROUNDS });
}
