//! What HTTP/1.1 is the same for both sides of the gateway: header lines passed on as bytes,
//! header names, `content-length` values, the limit on headers per head. The client listener's
//! fast path (`http1::server`) and the backend client (`http1::client`) both read heads with these.

use bytes::{Bytes, BytesMut};

pub use crate::body::RawHeaders;
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// Headers in one head at most, in either direction: hyper's own default, which the client
/// listener's fast path and hyper's server apply to requests too.
pub const MAX_HEADERS: usize = 100;

/// The largest head read, in either direction (and an HTTP/2 request's header list): Entra
/// tokens, the largest headers SDKs send, are a few kilobytes; Azure's answers' heads about 1.5.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Hop-by-hop headers (RFC 9110 §7.6.1) that never pass from one hop to the next, in either
/// direction. `connection`, `upgrade` and `transfer-encoding` are hop-by-hop too, but frame or
/// switch a connection, so each side reads them for itself.
pub const HOP_BY_HOP: [&str; 6] = [
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
];

/// Headers the gateway sets on every answer: a backend's own of these names are dropped.
pub const GATEWAY_SETS: [&str; 4] = [
    "x-request-id",
    "x-switchyard-backend",
    "x-switchyard-attempts",
    "x-switchyard-deployment",
];

/// Writes one header line, `name: value\r\n`: every head the gateway writes, requests to
/// backends and answers to clients, writes its lines with this.
#[inline(always)]
pub fn put_line(out: &mut impl bytes::BufMut, name: &[u8], value: &[u8]) {
    out.put_slice(name);
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// `n` in decimal, written into the end of `buf`.
pub fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// Whether `name` (in lowercase, as `http` keeps names) is one of [`HOP_BY_HOP`].
#[inline]
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.contains(&name)
}

/// A role table: `base`, then each of `names` with `role`. `T` must be the two lengths added,
/// which the build checks.
pub(crate) const fn with_names<R: Copy, const B: usize, const N: usize, const T: usize>(
    base: [(&'static [u8], R); B],
    names: [&'static str; N],
    role: R,
) -> [(&'static [u8], R); T] {
    assert!(T == B + N, "a role table's length is its parts' added");
    let mut out = [(b"" as &[u8], role); T];
    let mut i = 0;
    while i < B {
        out[i] = base[i];
        i += 1;
    }
    while i < T {
        out[i] = (names[i - B].as_bytes(), role);
        i += 1;
    }
    out
}
/// Header lines passed on as they came, gathered into one buffer. A line already in the form
/// `name: value\r\n` that starts where the previous one ended joins its run, and a run is
/// copied at once.
pub(crate) struct Lines {
    buf: BytesMut,
    run: std::ops::Range<usize>,
    /// The head's length: room for every line but in odd cases.
    room: usize,
}

impl Lines {
    #[inline]
    pub(crate) fn new(head_len: usize) -> Self {
        Lines {
            buf: BytesMut::new(),
            run: 0..0,
            room: head_len,
        }
    }

    /// Adds the header whose name and value are at these positions of `raw` (which httparse
    /// has checked).
    #[inline]
    pub(crate) fn push(
        &mut self,
        raw: &[u8],
        name: std::ops::Range<usize>,
        value: std::ops::Range<usize>,
    ) {
        if self.buf.capacity() == 0 {
            self.buf.reserve(self.room);
        }
        let canonical = raw.get(name.end..value.start) == Some(b": ");
        if canonical && raw.get(value.end..value.end + 2) == Some(b"\r\n") {
            if self.run.end != name.start {
                self.buf.extend_from_slice(&raw[self.run.clone()]);
                self.run = name.start..name.start;
            }
            self.run.end = value.end + 2;
        } else {
            self.buf
                .extend_from_slice(&raw[std::mem::replace(&mut self.run, 0..0)]);
            put_line(&mut self.buf, &raw[name], &raw[value]);
        }
    }

    /// The lines; empty, with nothing allocated, when there are none.
    #[inline]
    pub(crate) fn finish(mut self, raw: &[u8]) -> Bytes {
        self.buf.extend_from_slice(&raw[self.run]);
        if self.buf.is_empty() {
            Bytes::new()
        } else {
            self.buf.freeze()
        }
    }
}

/// Adds `name: value\r\n` lines to `headers`, values sharing `lines`' bytes.
pub(crate) fn append_lines(lines: &Bytes, headers: &mut HeaderMap) {
    let mut at = 0;
    while let Some(end) = memchr::memmem::find(&lines[at..], b"\r\n") {
        let line = at..at + end;
        at += end + 2;
        let Some(colon) = memchr::memchr(b':', &lines[line.clone()]) else {
            continue;
        };
        let name = header_name(&lines[line.start..line.start + colon]);
        let value = HeaderValue::from_maybe_shared(lines.slice(line.start + colon + 2..line.end));
        if let (Ok(name), Ok(value)) = (name, value) {
            headers.append(name, value);
        }
    }
}

// `RawHeaders` is the body type's (`crate::body`), which carries them; reading them into a map
// is HTTP/1.1's.
impl RawHeaders {
    /// Adds the lines to `headers`, for hyper and for anything that reads a response's
    /// headers as a whole.
    pub fn append_to(self, headers: &mut HeaderMap) {
        append_lines(&self.lines, headers);
    }
}

/// A header name as `http` holds it. `HeaderName::from_bytes` copies a name it does not know
/// into an allocation of its own, and looks standard ones up at some length; the names Azure
/// OpenAI, SDKs and the gateway exchange on every request are matched here first and shared.
/// A name sent with capitals (`Content-Type`, as curl and wrk write it) is matched lowercased.
pub(crate) fn header_name(raw: &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName> {
    if let Some(known) = known_name(raw) {
        return Ok(known);
    }
    let mut lower = [0u8; 32];
    if raw.len() <= lower.len() && raw.iter().any(u8::is_ascii_uppercase) {
        let lower = &mut lower[..raw.len()];
        lower.copy_from_slice(raw);
        lower.make_ascii_lowercase();
        if let Some(known) = known_name(lower) {
            return Ok(known);
        }
    }
    HeaderName::from_bytes(raw)
}

/// The shared name for `raw` when it is one of the frequent ones, as sent in lowercase.
fn known_name(raw: &[u8]) -> Option<HeaderName> {
    use http::header;
    static CUSTOM: [HeaderName; 14] = [
        HeaderName::from_static("x-ratelimit-remaining-tokens"),
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-limit-tokens"),
        HeaderName::from_static("x-ratelimit-limit-requests"),
        HeaderName::from_static("x-ratelimit-reset-tokens"),
        HeaderName::from_static("x-ratelimit-reset-requests"),
        HeaderName::from_static("retry-after-ms"),
        HeaderName::from_static("x-ms-region"),
        HeaderName::from_static("apim-request-id"),
        HeaderName::from_static("x-ms-client-request-id"),
        HeaderName::from_static("azureml-model-session"),
        HeaderName::from_static("api-key"),
        HeaderName::from_static("x-request-id"),
        HeaderName::from_static("openai-organization"),
    ];
    let known = match raw {
        b"content-type" => header::CONTENT_TYPE,
        b"content-length" => header::CONTENT_LENGTH,
        b"date" => header::DATE,
        b"host" => header::HOST,
        b"accept" => header::ACCEPT,
        b"accept-encoding" => header::ACCEPT_ENCODING,
        b"user-agent" => header::USER_AGENT,
        b"authorization" => header::AUTHORIZATION,
        b"retry-after" => header::RETRY_AFTER,
        b"x-ratelimit-remaining-tokens" => CUSTOM[0].clone(),
        b"x-ratelimit-remaining-requests" => CUSTOM[1].clone(),
        b"x-ratelimit-limit-tokens" => CUSTOM[2].clone(),
        b"x-ratelimit-limit-requests" => CUSTOM[3].clone(),
        b"x-ratelimit-reset-tokens" => CUSTOM[4].clone(),
        b"x-ratelimit-reset-requests" => CUSTOM[5].clone(),
        b"retry-after-ms" => CUSTOM[6].clone(),
        b"x-ms-region" => CUSTOM[7].clone(),
        b"apim-request-id" => CUSTOM[8].clone(),
        b"x-ms-client-request-id" => CUSTOM[9].clone(),
        b"azureml-model-session" => CUSTOM[10].clone(),
        b"api-key" => CUSTOM[11].clone(),
        b"x-request-id" => CUSTOM[12].clone(),
        b"openai-organization" => CUSTOM[13].clone(),
        _ => return None,
    };
    Some(known)
}

/// A `content-length` value: digits only (no sign, no spaces, no list), within `u64`.
pub(crate) fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_matched_in_the_table_are_the_ones_http_would_make() {
        for raw in [
            "content-type",
            "content-length",
            "date",
            "host",
            "accept",
            "accept-encoding",
            "user-agent",
            "authorization",
            "retry-after",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-limit-tokens",
            "x-ratelimit-limit-requests",
            "x-ratelimit-reset-tokens",
            "x-ratelimit-reset-requests",
            "retry-after-ms",
            "x-ms-region",
            "apim-request-id",
            "x-ms-client-request-id",
            "azureml-model-session",
            "api-key",
            "x-request-id",
            "openai-organization",
            "Content-Type",
            "Content-Length",
            "HOST",
            "X-Ratelimit-Remaining-Tokens",
            "X-Custom",
            "X-A-Custom-Name-Longer-Than-Thirty-Two-Bytes",
        ] {
            let ours = header_name(raw.as_bytes()).unwrap();
            assert_eq!(ours, HeaderName::from_bytes(raw.as_bytes()).unwrap());
            assert_eq!(ours.as_str(), raw.to_ascii_lowercase());
            // Every name on the list but the last two (`X-Custom`, `X-A-...`) is a shared one.
            let shared = known_name(raw.to_ascii_lowercase().as_bytes());
            let custom = raw.starts_with("X-C") || raw.starts_with("X-A-");
            assert_eq!(shared.is_some(), !custom, "{raw}");
        }
        assert!(header_name(b"bad name").is_err());
    }
}
