//! What the benchmark programs share: the date and commit their results files are named by.
#![allow(dead_code, reason = "not every benchmark names the commit")]

/// Today's date, `YYYY-MM-DD` (UTC), from the HTTP date, to avoid a calendar dependency.
pub fn today() -> String {
    let d = httpdate::fmt_http_date(std::time::SystemTime::now());
    // "Thu, 26 Nov 2026 04:00:00 GMT"
    let parts: Vec<&str> = d.split_whitespace().collect();
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[2])
    .map_or(0, |i| i + 1);
    format!("{}-{month:02}-{:0>2}", parts[3], parts[1])
}

/// The checked-out commit, short, for the results file.
pub fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}
