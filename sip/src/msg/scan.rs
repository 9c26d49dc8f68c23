//! Lexical helpers shared by the header and URI parsers (RFC 3261 §25.1).
//!
//! Everything here works on already-unfolded header values: the message
//! parser replaces each `CRLF 1*WSP` fold with a single space before typed
//! parsing starts, so only SP and HT count as linear white space here.

/// `token` characters: `alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~"`.
pub fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
        )
}

/// True when `s` is a non-empty `token`.
pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_token_char)
}

/// SP or HT.
pub fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Strips leading and trailing SP/HT.
pub fn trim_ws(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

/// Splits a header value on the commas that separate list elements
/// (RFC 3261 §7.3.1), ignoring commas inside quoted strings and `<...>`.
///
/// Empty elements (from `a,,b` or a trailing comma) are skipped; each element
/// is trimmed of surrounding white space.
pub fn split_list(value: &str) -> ListIter<'_> {
    ListIter { rest: value }
}

/// Iterator returned by [`split_list`].
#[derive(Debug, Clone)]
pub struct ListIter<'a> {
    rest: &'a str,
}

impl<'a> Iterator for ListIter<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        loop {
            if self.rest.is_empty() {
                return None;
            }
            let bytes = self.rest.as_bytes();
            let mut in_quote = false;
            let mut in_angle = false;
            let mut i = 0;
            let mut end = bytes.len();
            while i < bytes.len() {
                match bytes[i] {
                    b'\\' if in_quote => i += 1,
                    b'"' => in_quote = !in_quote,
                    b'<' if !in_quote => in_angle = true,
                    b'>' if !in_quote => in_angle = false,
                    b',' if !in_quote && !in_angle => {
                        end = i;
                        break;
                    }
                    _ => {}
                }
                i += 1;
            }
            let item = trim_ws(&self.rest[..end]);
            self.rest = if end < bytes.len() {
                &self.rest[end + 1..]
            } else {
                ""
            };
            if !item.is_empty() {
                return Some(item);
            }
        }
    }
}

/// Reads a `quoted-string` at the start of `s` (after optional white space).
///
/// Returns the content between the quotes (escapes kept as written) and the
/// rest after the closing quote, or `None` when the quote is not terminated.
pub fn quoted_string(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start_matches([' ', '\t']);
    let bytes = s.as_bytes();
    if bytes.first() != Some(&b'"') {
        return None;
    }
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Some((&s[1..i], &s[i + 1..])),
            _ => i += 1,
        }
    }
    None
}

/// Removes `quoted-pair` escapes from the content of a quoted string.
pub fn unescape_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Decodes `%HH` escapes (RFC 3261 §19.1.4); invalid escapes are kept as
/// written. The result may contain any octet, NUL included.
pub fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex_val(b[i + 1]), hex_val(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// A `;name[=value]` parameter list as written after a header value or URI.
///
/// Names are compared case-insensitively; values keep their written form
/// (quotes included for quoted values; see [`Params::get_unquoted`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Params<'a> {
    raw: &'a str,
}

impl<'a> Params<'a> {
    /// Wraps the text that follows the first `;` (without it). Callers
    /// validate with [`Params::parse_header_params`] or the URI parser.
    pub(crate) fn from_raw(raw: &'a str) -> Self {
        Params { raw }
    }

    /// The parameters as written, without the leading `;`.
    pub fn as_str(&self) -> &'a str {
        self.raw
    }

    /// True when there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// Iterates `(name, value)` pairs, names and values trimmed.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, Option<&'a str>)> + 'a {
        split_params(self.raw)
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((n, v)) => (trim_ws(n), Some(trim_ws(v))),
                None => (trim_ws(p), None),
            })
    }

    /// The value of parameter `name`: `Some(None)` for a flag, `None` when absent.
    pub fn get(&self, name: &str) -> Option<Option<&'a str>> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The value of `name` with surrounding quotes removed.
    pub fn get_unquoted(&self, name: &str) -> Option<&'a str> {
        let v = self.get(name)??;
        Some(
            v.strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v),
        )
    }

    /// True when the parameter is present, with or without a value.
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Validates header parameters: `generic-param = token [ EQUAL gen-value ]`,
    /// `gen-value = token / host / quoted-string`.
    /// `raw` is what follows the first `;` (`None` when there was none); an
    /// empty parameter (`;;`, a trailing `;`) is refused.
    pub(crate) fn parse_header_params(raw: Option<&'a str>) -> Result<Self, ()> {
        let Some(raw) = raw else {
            return Ok(Params::default());
        };
        for p in split_params(raw) {
            let (name, value) = match p.split_once('=') {
                Some((n, v)) => (trim_ws(n), Some(trim_ws(v))),
                None => (trim_ws(p), None),
            };
            if !is_token(name) {
                return Err(());
            }
            if let Some(v) = value {
                let ok = if v.starts_with('"') {
                    matches!(quoted_string(v), Some((_, rest)) if trim_ws(rest).is_empty())
                } else {
                    !v.is_empty()
                        && v.bytes()
                            .all(|b| is_token_char(b) || matches!(b, b':' | b'[' | b']'))
                };
                if !ok {
                    return Err(());
                }
            }
        }
        Ok(Params { raw })
    }
}

/// Splits `a;b=c;d="x;y"` on the semicolons outside quoted strings. Like
/// `str::split`, an empty input or a trailing `;` yields an empty item, so
/// that callers can refuse empty parameters.
fn split_params(raw: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(raw);
    std::iter::from_fn(move || {
        let cur = rest?;
        let b = cur.as_bytes();
        let mut in_quote = false;
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'\\' if in_quote => i += 1,
                b'"' => in_quote = !in_quote,
                b';' if !in_quote => {
                    rest = Some(&cur[i + 1..]);
                    return Some(&cur[..i]);
                }
                _ => {}
            }
            i += 1;
        }
        rest = None;
        Some(cur)
    })
}

/// Finds the first `;` outside a quoted string.
pub fn find_unquoted(s: &str, needle: u8) -> Option<usize> {
    let b = s.as_bytes();
    let mut in_quote = false;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if in_quote => i += 1,
            b'"' => in_quote = !in_quote,
            c if c == needle && !in_quote => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_split_respects_quotes_and_angles() {
        let v: Vec<_> = split_list(r#""a, b" <sip:x@y?h=1,2>;q=1 , <sip:z>,,"#).collect();
        assert_eq!(v, vec![r#""a, b" <sip:x@y?h=1,2>;q=1"#, "<sip:z>"]);
    }

    #[test]
    fn quoted_string_with_escapes() {
        let (q, rest) = quoted_string(r#" "J \"R\"" <x>"#).unwrap();
        assert_eq!(q, r#"J \"R\""#);
        assert_eq!(rest, " <x>");
        assert_eq!(unescape_quoted(q), r#"J "R""#);
        assert!(quoted_string(r#""unterminated"#).is_none());
        assert!(quoted_string(r#""ends in escape\"#).is_none());
    }

    #[test]
    fn params_lookup() {
        let p = Params::parse_header_params(Some(r#"tag = 19 ;lr;x="a;b""#)).unwrap();
        assert_eq!(p.get("TAG"), Some(Some("19")));
        assert_eq!(p.get("lr"), Some(None));
        assert_eq!(p.get_unquoted("x"), Some("a;b"));
        assert!(Params::parse_header_params(Some("bad name=1")).is_err());
        assert!(Params::parse_header_params(Some("x=\"open")).is_err());
        assert!(Params::parse_header_params(Some("")).is_err());
        assert!(Params::parse_header_params(Some("a;")).is_err());
        assert!(Params::parse_header_params(Some("a;;b")).is_err());
        assert_eq!(Params::parse_header_params(None), Ok(Params::default()));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("%00a%4"), vec![0, b'a', b'%', b'4']);
        assert_eq!(percent_decode("%41%zz"), b"A%zz".to_vec());
    }
}
