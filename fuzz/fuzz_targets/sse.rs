//! The usage tap on a response body, SSE or JSON, fed the input in pieces the input itself
//! chooses: it never panics, and when it strips nothing it passes every byte on unchanged.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use switchyard::usage::Tap;

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let content_type = if control & 1 == 0 {
        "text/event-stream"
    } else {
        "application/json"
    };
    let strip = control & 2 != 0;
    let Some(mut tap) = Tap::new(Some(content_type), strip) else {
        return;
    };
    // Piece sizes 1..=16 from the control byte's high bits, cycling.
    let step = usize::from(control >> 4) + 1;
    let mut out = Vec::with_capacity(rest.len());
    for piece in rest.chunks(step) {
        out.extend_from_slice(&tap.feed(Bytes::copy_from_slice(piece)));
    }
    let (tail, _usage) = tap.finish();
    out.extend_from_slice(&tail);
    if strip {
        assert!(out.len() <= rest.len());
    } else {
        assert_eq!(out, rest);
    }
});
