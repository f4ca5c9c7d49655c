//! A backend's response head, whatever its bytes: never a panic, and every header line the
//! gateway passes on unread is one entry when put back in a map.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((headers, read, lines))) = switchyard::http1::client::parse_response_head(data) {
        assert_eq!(headers.len(), read + lines);
    }
});
