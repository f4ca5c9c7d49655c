//! Request paths: never a panic, and a deployment found is where the route says it is, made
//! of the characters Azure allows.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(pq) = std::str::from_utf8(data) else {
        return;
    };
    let path = pq.split('?').next().unwrap_or(pq);
    if let Ok(route) = switchyard::api::route(path, pq) {
        if let (Some(d), Some(span)) = (route.deployment, route.deployment_span) {
            assert_eq!(&route.path_and_query[span], d);
            assert!(
                d.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            );
        }
        assert!(path.split('/').all(|seg| seg != ".." && seg != "."));
    }
});
