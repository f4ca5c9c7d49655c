//! A client's request head as the fast HTTP/1.1 path reads it, whatever its bytes: never a
//! panic; what it serves itself is what httparse reads too (method, target but a fragment,
//! every header in the map or in the lines passed on, none lost or made up), with a known
//! method, a body of at most 1 MiB and no framing or protocol switch it leaves to hyper.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::server::{ParsedHead, RequestHead, parse_request_head, passes_raw};

const MAX_HEAD: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let ParsedHead::Head(head, consumed) = parse_request_head(data, MAX_HEAD) else {
        return;
    };
    let RequestHead {
        method,
        uri,
        headers,
        passthrough,
        body_len,
        close: _,
    } = head;
    assert!(consumed <= data.len() && consumed <= MAX_HEAD);
    assert!(matches!(
        method.as_str(),
        "GET" | "POST" | "PUT" | "PATCH" | "DELETE"
    ));
    assert!(body_len <= 1 << 20);
    assert!(uri.path().starts_with('/'));
    for name in ["transfer-encoding", "upgrade", "expect"] {
        assert!(!headers.contains_key(name), "{name} on the fast path");
    }
    assert!(headers.get_all("content-length").iter().count() <= 1);

    // httparse, on its own, reads the same head.
    let mut slots = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut slots);
    let Ok(httparse::Status::Complete(n)) = req.parse(&data[..consumed]) else {
        panic!("the fast path served a head httparse does not read");
    };
    assert_eq!(n, consumed);
    assert_eq!(req.method, Some(method.as_str()));
    // A fragment (`#...`) is no part of what a server reads, for `http` as for hyper.
    let target = req.path.map(|p| p.split('#').next().unwrap_or(p));
    assert_eq!(target, uri.path_and_query().map(|p| p.as_str()).or(Some(uri.path())));

    // Every header is in the map or in the lines, once.
    let mut lines = 0;
    for line in passthrough.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let line = line.strip_suffix(b"\r").expect("a passed line ends with CRLF");
        let colon = line.iter().position(|b| *b == b':').expect("a passed line has a name");
        assert!(passes_raw(&line[..colon]), "a header the gateway reads was passed raw");
        lines += 1;
    }
    assert_eq!(headers.len() + lines, req.headers.len());
});
