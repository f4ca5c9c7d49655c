//! Retry hints from a backend's headers, whatever their values: never a panic.
#![no_main]

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 4] = [
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
];

fuzz_target!(|data: &[u8]| {
    // Values separated by NUL bytes, assigned to the hint headers in turn.
    let mut headers = HeaderMap::new();
    for (i, value) in data.split(|b| *b == 0).enumerate().take(8) {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.append(HeaderName::from_static(NAMES[i % NAMES.len()]), v);
        }
    }
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
    let _ = switchyard::balancer::retry_hint(&headers, now);
});
