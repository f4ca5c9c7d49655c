//! Reading a request head on the fast path: what it serves, what it hands to hyper, which
//! headers it keeps in the request's map and which it passes on as lines, and the `Host` rule.

use super::*;

/// A parsed head, before its body is read.
#[doc(hidden)]
pub struct Head {
    pub method: Method,
    pub uri: Uri,
    /// The headers the gateway reads, or that must not reach a backend as they came.
    pub headers: HeaderMap,
    /// The rest, as `name: value\r\n` lines (see [`Role::Passed`]).
    pub passthrough: Bytes,
    pub body_len: usize,
    /// `Connection: close`: answer, then close.
    pub close: bool,
}

#[expect(
    clippy::large_enum_variant,
    reason = "boxing the head would cost an allocation per request to shrink a value that lives briefly"
)]
pub(super) enum ReadHead {
    Head(Head),
    /// Well-formed for HTTP but not for the gateway (a request target `Uri` refuses).
    Invalid(GatewayError),
    NotMine,
}

#[expect(clippy::large_enum_variant, reason = "as `ReadHead`")]
pub(super) enum Parse {
    Partial,
    Head(Head),
    Invalid(GatewayError),
    NotMine,
}

pub(super) fn parse(buf: &mut BytesMut, max_head: usize) -> Parse {
    // Left uninitialised: zeroing 100 slots per request cost more than the parse.
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) if n <= max_head => n,
        Ok(httparse::Status::Partial) if buf.len() < max_head => return Parse::Partial,
        // Too large, too many headers, malformed: hyper's answer (431, 400 or a close).
        _ => return Parse::NotMine,
    };
    if req.version != Some(1) {
        return Parse::NotMine;
    }
    let method = match req.method {
        Some("POST") => Method::POST,
        Some("GET") => Method::GET,
        Some("DELETE") => Method::DELETE,
        Some("PUT") => Method::PUT,
        Some("PATCH") => Method::PATCH,
        _ => return Parse::NotMine,
    };
    let Some(path) = req.path.filter(|p| p.starts_with('/')) else {
        return Parse::NotMine;
    };
    let base = buf.as_ptr() as usize;
    let path_at = (path.as_ptr() as usize - base, path.len());
    let mut spans = Vec::with_capacity(req.headers.len());
    let mut body_len = None;
    let mut close = false;
    let mut pass_on = true;
    let mut hosts = 0u32;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let role = request_role(name);
        match role {
            Role::NotMine => return Parse::NotMine,
            Role::ContentLength => match parse_length(h.value) {
                // One length, and small enough to read whole here.
                Some(n) if body_len.is_none() && n <= MAX_BODY as u64 => {
                    body_len = Some(n as usize)
                }
                _ => return Parse::NotMine,
            },
            Role::Connection => {
                close |= has_token(h.value, b"close");
                // Names listed in `connection` are hop-by-hop and must stay out of the lines
                // passed on; rare enough to keep every header in the map then.
                let listed = |t: &[u8]| {
                    let t = t.trim_ascii();
                    !t.is_empty()
                        && !t.eq_ignore_ascii_case(b"close")
                        && !t.eq_ignore_ascii_case(b"keep-alive")
                };
                pass_on &= !h.value.split(|b| *b == b',').any(listed);
            }
            Role::Host => {
                hosts += 1;
                if !valid_host(h.value) {
                    hosts += 1;
                }
            }
            Role::Kept | Role::Passed => {}
        }
        spans.push((
            h.name.as_ptr() as usize - base,
            name.len(),
            h.value.as_ptr() as usize - base,
            h.value.len(),
            role == Role::Passed,
        ));
    }
    let raw = buf.split_to(len).freeze();
    let invalid = |what: &str| {
        Parse::Invalid(GatewayError::new(
            ErrorKind::BadRequest,
            format!("invalid request: {what}"),
        ))
    };
    // RFC 9112 §3.2: exactly one, and valid (counted twice above when not).
    if hosts != 1 {
        return Parse::Invalid(GatewayError::new(ErrorKind::BadRequest, NO_HOST));
    }
    let Ok(uri) = Uri::from_maybe_shared(raw.slice(path_at.0..path_at.0 + path_at.1)) else {
        return invalid("the request target is not a valid path");
    };
    let mut headers = HeaderMap::with_capacity(spans.len());
    let mut lines = Lines::new(len);
    for (n, nl, v, vl, passed) in spans {
        if pass_on && passed {
            lines.push(&raw, n..n + nl, v..v + vl);
            continue;
        }
        let name = &raw[n..n + nl];
        let Ok(name) = header_name(name) else {
            return invalid("a header name is not a token");
        };
        let Ok(value) = HeaderValue::from_maybe_shared(raw.slice(v..v + vl)) else {
            return invalid("a header value holds a control character");
        };
        headers.append(name, value);
    }
    Parse::Head(Head {
        method,
        uri,
        headers,
        passthrough: lines.finish(&raw),
        body_len: body_len.unwrap_or(0),
        close,
    })
}

/// What the fast path made of a request head, for the fuzz target (`request_head`).
#[doc(hidden)]
#[expect(
    clippy::large_enum_variant,
    reason = "made once per fuzz input, never on the request path"
)]
pub enum Parsed {
    /// More bytes are needed.
    Partial,
    /// Served here: the head, and the bytes it took.
    Head(Head, usize),
    /// Answered here with a 400.
    Invalid,
    /// Handed to hyper.
    NotMine,
}

#[doc(hidden)]
pub fn parse_for_fuzz(bytes: &[u8], max_head: usize) -> Parsed {
    let mut buf = BytesMut::from(bytes);
    match parse(&mut buf, max_head) {
        Parse::Partial => Parsed::Partial,
        Parse::Invalid(_) => Parsed::Invalid,
        Parse::NotMine => Parsed::NotMine,
        Parse::Head(h) => Parsed::Head(h, bytes.len() - buf.len()),
    }
}

/// Whether the fast path passes a request header with this name on as a raw line.
#[doc(hidden)]
pub fn passes_raw(name: &[u8]) -> bool {
    request_role(name) == Role::Passed
}

/// What the fast path does with a request header.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Role {
    /// Framing or protocol switches this path leaves to hyper.
    NotMine,
    ContentLength,
    Connection,
    /// Checked here (exactly one, a valid `host[:port]`), then kept.
    Host,
    /// Read by the gateway (routing, auth, limits, tracing) or by the admin API, or not to
    /// reach a backend as it came (hop-by-hop, credentials, `host`, `x-request-id`): into the
    /// request's map.
    Kept,
    /// Any other (`user-agent`, `accept`, an SDK's `x-stainless-*` ...): passed on to the
    /// backend as a raw line: filling a `HeaderMap` with it only to write it out again is
    /// dear, and an SDK sends a dozen.
    Passed,
}

/// The request headers that do not pass on as lines, and what the fast path does with them.
pub(super) const ROLES: [(&[u8], Role); 21] = with_names(
    [
        (b"transfer-encoding", Role::NotMine),
        (b"upgrade", Role::NotMine),
        (b"expect", Role::NotMine),
        (b"content-length", Role::ContentLength),
        (b"connection", Role::Connection),
        (b"host", Role::Host),
        (b"content-type", Role::Kept),
        (b"api-key", Role::Kept),
        (b"authorization", Role::Kept),
        (b"ocp-apim-subscription-key", Role::Kept),
        (b"x-admin-key", Role::Kept),
        (b"x-request-id", Role::Kept),
        (b"traceparent", Role::Kept),
        // Read by the admin listener, which serves no page of another origin.
        (b"origin", Role::Kept),
        (b"sec-fetch-site", Role::Kept),
    ],
    HOP_BY_HOP,
    Role::Kept,
);

/// For each first letter and length, which name of [`ROLES`] has them (its index plus one; 0
/// for none). No two names share both, which the build checks.
pub(super) static BY_FIRST_AND_LENGTH: [[u8; 32]; 26] = {
    let mut t = [[0u8; 32]; 26];
    let mut i = 0;
    while i < ROLES.len() {
        let n = ROLES[i].0;
        let slot = &mut t[(n[0] - b'a') as usize][n.len()];
        assert!(*slot == 0, "two names share a first letter and a length");
        *slot = i as u8 + 1;
        i += 1;
    }
    t
};

/// The role of a request header by its name, in any case: the one name of [`ROLES`] with its
/// first letter and length, if any, compared ignoring case. Most names an SDK sends
/// (`User-Agent`, `X-Stainless-*` ...) have none, and pass on after a table read, cheaper than
/// lowercasing each name on the stack for a `match`. `| 0x20`
/// lowercases a letter; what it makes of other bytes is at worst a candidate that the
/// comparison turns down.
pub(super) fn request_role(name: &[u8]) -> Role {
    let candidate = name.first().and_then(|&c| {
        let letter = usize::from((c | 0x20).wrapping_sub(b'a'));
        let i = *BY_FIRST_AND_LENGTH.get(letter)?.get(name.len())?;
        ROLES.get(usize::from(i).checked_sub(1)?)
    });
    match candidate {
        Some(&(known, role)) if known.eq_ignore_ascii_case(name) => role,
        _ => Role::Passed,
    }
}

/// What a request without exactly one valid `Host` is told.
pub const NO_HOST: &str = "an HTTP/1.1 request needs exactly one valid Host header";

/// `host[:port]` (RFC 9110 §7.2): a registered name (letters, digits, `-._~`, sub-delims,
/// percent-encodings) or a bracketed IP literal, then an optional port. No user part, path or
/// space. One table read a byte: this runs for every request.
pub fn valid_host(v: &[u8]) -> bool {
    let host_len = match v.first() {
        None => return false,
        Some(b'[') => match memchr::memchr(b']', v) {
            Some(end)
                if end > 1
                    && v[1..end]
                        .iter()
                        .all(|&b| HOST[usize::from(b)] & LITERAL != 0) =>
            {
                end + 1
            }
            _ => return false,
        },
        Some(_) => v
            .iter()
            .position(|&b| HOST[usize::from(b)] & NAME == 0)
            .unwrap_or(v.len()),
    };
    match v[host_len..].split_first() {
        None => host_len > 0,
        Some((b':', digits)) => {
            host_len > 0 && digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit)
        }
        Some(_) => false,
    }
}

/// [`HOST`] bits: a registered name's byte; an IP literal's (between the brackets).
pub(super) const NAME: u8 = 1;

pub(super) const LITERAL: u8 = 2;

pub(super) static HOST: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0usize;
    while c < 256 {
        let b = c as u8;
        if b.is_ascii_alphanumeric() {
            t[c] |= NAME;
        }
        if b.is_ascii_hexdigit() || b == b':' || b == b'.' {
            t[c] |= LITERAL;
        }
        c += 1;
    }
    let others = b"-._~!$&'()*+,;=%";
    let mut i = 0;
    while i < others.len() {
        t[others[i] as usize] |= NAME;
        i += 1;
    }
    t
};

pub(super) fn has_token(list: &[u8], token: &[u8]) -> bool {
    list.split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_roles_are_found_in_any_case_and_every_other_name_passes_on() {
        use super::{ROLES, Role, request_role};
        for (name, role) in ROLES {
            let upper = name.to_ascii_uppercase();
            let mut mixed = name.to_vec();
            mixed[0] = mixed[0].to_ascii_uppercase();
            for n in [name, &upper[..], &mixed[..]] {
                assert!(request_role(n) == role, "{}", String::from_utf8_lossy(n));
            }
        }
        assert!(request_role(b"Content-Length") == Role::ContentLength);
        assert!(request_role(b"CONNECTION") == Role::Connection);
        assert!(request_role(b"Transfer-Encoding") == Role::NotMine);
        // Names that share a first letter and length with one above, or nothing, pass on.
        let others: [&[u8]; 27] = [
            b"accept",
            b"Accept-Encoding",
            b"accept-language",
            b"User-Agent",
            b"cache-control",
            b"cookie",
            b"date",
            b"origins",
            b"referer",
            b"via",
            b"x-forwarded-for",
            b"x-ms-client-request-id",
            b"openai-organization",
            b"X-Stainless-Lang",
            b"X-Stainless-Package-Version",
            b"X-Stainless-OS",
            b"x-stainless-retry-count",
            b"hose",
            b"hosts",
            b"x-request-ix",
            b"tE-",
            b"",
            b"1host",
            b"@ost",
            b"[ost",
            b"a",
            b"ocp-apim-subscription-key-and-then-some",
        ];
        for n in others {
            assert!(
                request_role(n) == Role::Passed,
                "{}",
                String::from_utf8_lossy(n)
            );
        }
    }

    #[test]
    fn a_fragment_in_the_target_is_no_part_of_the_request() {
        // As `http` (and so hyper) reads a target: the fragment is dropped, the rest served.
        let head = b"GET /openai/files?api-version=20#4-10-21 HTTP/1.1\r\nhost: x\r\n\r\n";
        match super::parse_for_fuzz(head, 64 * 1024) {
            super::Parsed::Head(parsed, consumed) => {
                assert_eq!(
                    parsed.uri.path_and_query().unwrap().as_str(),
                    "/openai/files?api-version=20"
                );
                assert_eq!(consumed, head.len());
            }
            _ => panic!("not served on the fast path"),
        }
    }

    #[test]
    fn hosts_are_a_name_or_an_ip_literal_and_a_port() {
        use super::valid_host;
        for ok in [
            "gw",
            "gw:8080",
            "gw:",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:443",
            "a-b.c_d~e",
            "xn--bcher-kva.example",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            ":80",
            "user@gw",
            "gw/x",
            "g w",
            "[::1",
            "[]",
            "[zz]",
            "gw:80x",
            "gw:123456",
            "[::1]x",
            "gw\t",
            "gw?",
            "gw#",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
    }
}
