//! Request paths: never a panic; a deployment found is where the route says it is, made of
//! the characters Azure allows; what is forwarded is canonical (no empty or dot segment, no
//! `\`), and routing it again changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(pq) = std::str::from_utf8(data) else {
        return;
    };
    let path = pq.split('?').next().unwrap_or(pq);
    if let Ok(route) = switchyard::api::classify(path, pq) {
        if let Some(d) = route.deployment() {
            assert!(
                d.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            );
        }
        let forwarded = route.path_and_query.split('?').next().unwrap_or("");
        assert!(!forwarded.contains('\\'));
        assert!(
            forwarded
                .split('/')
                .skip(1)
                .all(|seg| !seg.is_empty() && seg != ".." && seg != ".")
                || forwarded == "/"
        );
        let again = switchyard::api::classify(forwarded, &route.path_and_query)
            .expect("a canonical path routes again");
        assert_eq!(again.path_and_query, route.path_and_query);
        assert_eq!(again.deployment(), route.deployment());
    }
});
