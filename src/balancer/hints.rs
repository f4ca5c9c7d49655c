//! How long a backend asks us to stay away: `retry-after-ms` (or `x-ms-retry-after-ms`), then
//! `retry-after` (seconds or an HTTP date), then `x-ratelimit-reset-requests` /
//! `x-ratelimit-reset-tokens`. Garbage is ignored, never trusted; the caller caps what is left.

use std::time::{Duration, SystemTime};

use http::HeaderMap;

/// The wait a response asks for, if it says anything usable.
pub fn retry_hint(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    for name in ["retry-after-ms", "x-ms-retry-after-ms"] {
        if let Some(d) = get(name).and_then(parse_millis) {
            return Some(d);
        }
    }
    if let Some(d) = get("retry-after").and_then(|v| parse_retry_after(v, now)) {
        return Some(d);
    }
    // Both resets may be present; the request can go again when both budgets have refilled.
    ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
        .iter()
        .filter_map(|n| get(n).and_then(parse_reset))
        .max()
}

fn parse_millis(v: &str) -> Option<Duration> {
    let ms: f64 = v.parse().ok()?;
    (ms.is_finite() && ms >= 0.0).then(|| Duration::from_secs_f64((ms / 1000.0).min(1e9)))
}

/// `Retry-After`: delta-seconds, or an HTTP date (RFC 9110 §10.2.3).
fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    if v.bytes().all(|b| b.is_ascii_digit()) && !v.is_empty() {
        // Digits only; a value too long for u64 is "very long", which the cap handles.
        return Some(Duration::from_secs(
            v.parse::<u64>().unwrap_or(u64::MAX / 2),
        ));
    }
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(1e9)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `x-ratelimit-reset-*`: plain seconds (`"12"`, `"0.5"`) or a duration like `"1m30s"`, `"250ms"`.
fn parse_reset(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(1e9)));
    }
    let mut total = 0.0f64;
    let mut rest = v;
    let mut any = false;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !c.is_ascii_digit() && c != '.')?;
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_end] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * factor;
        rest = &rest[unit_end..];
        any = true;
    }
    (any && total.is_finite()).then(|| Duration::from_secs_f64(total.min(1e9)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hint(pairs: &[(&'static str, &str)]) -> Option<Duration> {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(http::HeaderName::from_static(k), v.parse().unwrap());
        }
        let now = httpdate::parse_http_date("Wed, 25 Nov 2026 10:00:00 GMT").unwrap();
        retry_hint(&h, now)
    }

    #[test]
    fn milliseconds_win() {
        assert_eq!(
            hint(&[("retry-after-ms", "1500"), ("retry-after", "9")]),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            hint(&[("x-ms-retry-after-ms", "20")]),
            Some(Duration::from_millis(20))
        );
    }

    #[test]
    fn seconds_and_http_dates() {
        assert_eq!(hint(&[("retry-after", "7")]), Some(Duration::from_secs(7)));
        assert_eq!(
            hint(&[("retry-after", "Wed, 25 Nov 2026 10:00:30 GMT")]),
            Some(Duration::from_secs(30))
        );
        // A date in the past means "now".
        assert_eq!(
            hint(&[("retry-after", "Wed, 25 Nov 2026 09:00:00 GMT")]),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn ratelimit_resets() {
        assert_eq!(
            hint(&[("x-ratelimit-reset-tokens", "12")]),
            Some(Duration::from_secs(12))
        );
        assert_eq!(
            hint(&[
                ("x-ratelimit-reset-requests", "1m30s"),
                ("x-ratelimit-reset-tokens", "250ms")
            ]),
            Some(Duration::from_secs(90))
        );
    }

    #[test]
    fn garbage_is_ignored_and_huge_values_survive_for_the_cap() {
        assert_eq!(hint(&[("retry-after", "soon")]), None);
        assert_eq!(hint(&[("retry-after-ms", "-5")]), None);
        assert_eq!(
            hint(&[("retry-after-ms", "NaN"), ("retry-after", "3")]),
            Some(Duration::from_secs(3))
        );
        assert_eq!(hint(&[("x-ratelimit-reset-tokens", "5parsecs")]), None);
        assert_eq!(hint(&[]), None);
        assert!(hint(&[("retry-after", "86400")]).unwrap() >= Duration::from_secs(86400));
        assert!(
            hint(&[("retry-after", "99999999999999999999999")]).unwrap()
                > Duration::from_secs(86400)
        );
        assert!(hint(&[("retry-after-ms", "1e300")]).unwrap() > Duration::from_secs(86400));
    }
}
