//! RFC 4475 and RFC 5118 torture messages, classified by the parser and the
//! RFC 3261 §8.2 / §10.3 checks as `expected.tsv` in `../shared/conformance`
//! says. The verdict rules mirror the conformance driver (`run.py`): a message
//! passes when the outcome an element built on this stack would produce
//! satisfies `pass_if`.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use bytes::Bytes;
use sip::msg::check::{Caps, check_register, check_request};
use sip::msg::{Contacts, Framing, HeaderName, Limits, Message, Method, error_response};

/// What an element answers: a status with its header names and, for a
/// successful REGISTER, the contact URIs it would bind; or nothing.
#[derive(Debug)]
struct Outcome {
    code: Option<u16>,
    headers: Vec<String>,
    contacts: Vec<String>,
    cseq_method: Option<String>,
    why: String,
}

fn classify(bytes: &[u8]) -> Outcome {
    let none = |why: String| Outcome {
        code: None,
        headers: vec![],
        contacts: vec![],
        cseq_method: None,
        why,
    };
    let msg = match Message::parse(
        Bytes::copy_from_slice(bytes),
        Framing::Datagram,
        &Limits::default(),
    ) {
        Ok(m) => m,
        Err(e) => {
            return match error_response(bytes, &e) {
                Some(r) => Outcome {
                    code: r.status(),
                    headers: vec![],
                    contacts: vec![],
                    cseq_method: r
                        .header(HeaderName::CSeq)
                        .map(|c| c.split_whitespace().last().unwrap_or("").to_string()),
                    why: format!("parse error: {e}"),
                },
                None => none(format!("dropped: {e}")),
            };
        }
    };
    if !msg.is_request() {
        return none("stray response dropped".into());
    }
    let method = msg.method().unwrap();
    let reply = |code: u16, headers: Vec<String>, contacts: Vec<String>, why: String| Outcome {
        code: Some(code),
        headers,
        contacts,
        cseq_method: Some(msg.cseq().unwrap().method.to_string()),
        why,
    };
    if let Err(r) = check_request(&msg, &Caps::default()) {
        let resp = r.response_to(&msg, Some("t"));
        let names = resp
            .headers()
            .iter()
            .map(|h| h.name_str().to_string())
            .collect();
        return reply(
            r.code,
            names,
            vec![],
            format!("check_request: {} {}", r.code, r.reason),
        );
    }
    if method == Method::Register {
        if let Err(r) = check_register(&msg) {
            return reply(
                r.code,
                vec![],
                vec![],
                format!("check_register: {}", r.code),
            );
        }
        let contacts = match msg.contacts().unwrap() {
            Contacts::Star => vec![],
            Contacts::List(l) => l.iter().map(|c| c.uri_raw.to_string()).collect(),
        };
        return reply(200, vec!["Contact".into()], contacts, "registered".into());
    }
    reply(200, vec![], vec![], "accepted".into())
}

fn code_matches(tok: &str, code: u16) -> bool {
    match tok {
        "any" => true,
        t if t.len() == 3 && t.ends_with("xx") => t.as_bytes()[0] == b'0' + (code / 100) as u8,
        t => t.parse::<u16>() == Ok(code),
    }
}

fn code_matches_any(toks: &[&str], code: u16) -> bool {
    let pos = toks.iter().filter(|t| !t.starts_with('!') && **t != "none");
    let mut neg = toks.iter().filter_map(|t| t.strip_prefix('!'));
    pos.clone().any(|t| code_matches(t, code)) && !neg.any(|t| code_matches(t, code))
}

/// Percent-decodes and lower-cases for the contact_uri_has/lacks comparisons.
fn norm(s: &str) -> String {
    String::from_utf8_lossy(&sip::msg::scan::percent_decode(s)).to_ascii_lowercase()
}

fn requirements_ok(reqs: &[&str], o: &Outcome) -> Vec<String> {
    let mut why = vec![];
    for r in reqs {
        if let Some(x) = r.strip_prefix("contact_uri_has=") {
            if !o.contacts.iter().any(|c| norm(c).contains(&norm(x))) {
                why.push(format!("no contact has {x}: {:?}", o.contacts));
            }
        } else if let Some(x) = r.strip_prefix("contact_uri_lacks=") {
            if o.contacts.iter().any(|c| norm(c).contains(&norm(x))) {
                why.push(format!("a contact has {x}: {:?}", o.contacts));
            }
        } else if !o.headers.iter().any(|h| h.eq_ignore_ascii_case(r)) {
            why.push(format!("missing header {r}"));
        }
    }
    why
}

fn verdict(pass_if: &str, check_if: &str, o: &Outcome) -> &'static str {
    let ctoks: Vec<&str> = check_if.split_whitespace().collect();
    let mut ptoks: Vec<&str> = pass_if.split_whitespace().collect();
    if let Some(m) = ptoks.iter().find_map(|t| t.strip_prefix("only_cseq="))
        && o.cseq_method
            .as_deref()
            .is_some_and(|c| !c.eq_ignore_ascii_case(m))
    {
        return "FAIL";
    }
    ptoks.retain(|t| !t.starts_with("only_cseq="));
    let Some(code) = o.code else {
        return if ptoks.contains(&"none") {
            "PASS"
        } else if ctoks.contains(&"none") {
            "CHECK"
        } else {
            "FAIL"
        };
    };
    if ptoks.iter().all(|t| *t == "none") {
        return if code_matches_any(&ctoks, code) {
            "CHECK"
        } else {
            "FAIL"
        };
    }
    if ptoks
        .iter()
        .filter_map(|t| t.strip_prefix('!'))
        .any(|n| code_matches(n, code))
    {
        return if code_matches_any(&ctoks, code) {
            "CHECK"
        } else {
            "FAIL"
        };
    }
    for t in &ptoks {
        if t.starts_with('!') || *t == "none" {
            continue;
        }
        let mut parts = t.split('+');
        let base = parts.next().unwrap_or("");
        if code_matches(base, code) {
            let reqs: Vec<&str> = parts.collect();
            return if requirements_ok(&reqs, o).is_empty() {
                "PASS"
            } else {
                "FAIL"
            };
        }
    }
    if code_matches_any(&ctoks, code) {
        "CHECK"
    } else {
        "FAIL"
    }
}

fn shared_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    for cand in [
        manifest.join("../../shared/conformance"),
        manifest.join("../shared/conformance"),
    ] {
        if cand.is_dir() {
            return cand;
        }
    }
    panic!("../shared/conformance not found beside the repository");
}

fn run_set(set: &str, expected_count: usize) {
    let dir = shared_dir().join(set);
    let tsv = std::fs::read_to_string(dir.join("expected.tsv")).unwrap();
    let mut rows = tsv.lines();
    let header: Vec<&str> = rows.next().unwrap().split('\t').collect();
    let col = |n: &str| header.iter().position(|h| *h == n).unwrap();
    let (ci_name, ci_pass, ci_check) = (col("name"), col("pass_if"), col("check_if"));
    let mut failures = vec![];
    let mut count = 0;
    for row in rows.filter(|r| !r.trim().is_empty()) {
        let f: Vec<&str> = row.split('\t').collect();
        let name = f[ci_name];
        let bytes = std::fs::read(dir.join(format!("{name}.dat"))).unwrap();
        let o = classify(&bytes);
        let v = verdict(f[ci_pass], f.get(ci_check).copied().unwrap_or(""), &o);
        println!("{v:5} {set}/{name}: {:?} ({})", o.code, o.why);
        count += 1;
        if v != "PASS" {
            failures.push(format!(
                "{name}: {v} {:?} ({}) pass_if={}",
                o.code, o.why, f[ci_pass]
            ));
        }
    }
    assert_eq!(count, expected_count, "message count in {set}");
    assert!(
        failures.is_empty(),
        "not classified as expected:\n{}",
        failures.join("\n")
    );
}

#[test]
fn rfc4475_torture_messages() {
    run_set("rfc4475", 49);
}

#[test]
fn rfc5118_ipv6_torture_messages() {
    run_set("rfc5118", 12);
}
