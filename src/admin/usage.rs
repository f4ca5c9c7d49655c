//! `GET /admin/usage`: the usage ledger as a chargeback report, in JSON or CSV, and the status
//! page's consumers view (this day's and month's figures and each budget as it stands).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::config::QuotaPeriod;
use crate::error::{ErrorKind, GatewayError};
use crate::live::Snapshot;
use crate::usage::ledger::{self, Entry, Grouping, Hour, Line, Tally};

use super::AdminState;

/// How the report's lines are cut in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interval {
    Hour,
    Day,
    Total,
}

impl Interval {
    fn as_str(self) -> &'static str {
        match self {
            Interval::Hour => "hour",
            Interval::Day => "day",
            Interval::Total => "total",
        }
    }
}

/// What a report asks for, from the query string.
#[derive(Debug, PartialEq)]
struct Query {
    from: Hour,
    to: Hour,
    grouping: Grouping,
    interval: Interval,
    csv: bool,
}

fn bad(param: &str, message: String) -> GatewayError {
    GatewayError::new(
        ErrorKind::BadRequest,
        format!("query parameter {param}: {message}"),
    )
}

/// A time as `2026-12-01`, `2026-12-01T10:00:00Z` (any RFC 3339 time in UTC) or Unix seconds.
fn parse_time(param: &str, v: &str) -> Result<SystemTime, GatewayError> {
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return v
            .parse::<u64>()
            .ok()
            .and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s)))
            .ok_or_else(|| bad(param, format!("{v:?} is out of range")));
    }
    let full = if v.len() == 10 {
        format!("{v}T00:00:00Z")
    } else {
        v.to_string()
    };
    humantime::parse_rfc3339(&full).map_err(|_| {
        bad(
            param,
            format!(
                "{:?} is not a time: give a date (2026-12-01), a UTC time (2026-12-01T10:00:00Z) or Unix seconds",
                v.chars().take(64).collect::<String>()
            ),
        )
    })
}

impl Query {
    /// Reads `from`, `to` (default: the last 24 hours), `group_by` (default
    /// `consumer,deployment`), `interval` (`hour`, `day` or `total`) and `format`.
    fn parse(
        query: Option<&str>,
        now: SystemTime,
        retention: Duration,
    ) -> Result<Self, GatewayError> {
        let mut from = None;
        let mut to = None;
        let mut grouping = Grouping {
            consumer: true,
            deployment: true,
            hour: true,
        };
        let mut interval = Interval::Hour;
        let mut csv = false;
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*k {
                "from" => from = Some(parse_time("from", &v)?),
                "to" => to = Some(parse_time("to", &v)?),
                "group_by" => {
                    grouping.consumer = false;
                    grouping.deployment = false;
                    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                        match part {
                            "consumer" => grouping.consumer = true,
                            "deployment" => grouping.deployment = true,
                            other => {
                                return Err(bad(
                                    "group_by",
                                    format!(
                                        "{:?} is not consumer or deployment (a comma-separated list of them, or empty)",
                                        other.chars().take(64).collect::<String>()
                                    ),
                                ));
                            }
                        }
                    }
                }
                "interval" => {
                    interval = match &*v {
                        "hour" => Interval::Hour,
                        "day" => Interval::Day,
                        "total" => Interval::Total,
                        other => {
                            return Err(bad(
                                "interval",
                                format!(
                                    "{:?} is not hour, day or total",
                                    other.chars().take(64).collect::<String>()
                                ),
                            ));
                        }
                    }
                }
                "format" => {
                    csv = match &*v {
                        "json" => false,
                        "csv" => true,
                        other => {
                            return Err(bad(
                                "format",
                                format!(
                                    "{:?} is not json or csv",
                                    other.chars().take(64).collect::<String>()
                                ),
                            ));
                        }
                    }
                }
                other => {
                    return Err(bad(
                        &other.chars().take(64).collect::<String>(),
                        "unknown; use from, to, group_by, interval and format".to_string(),
                    ));
                }
            }
        }
        let to = to.unwrap_or(now);
        let from = from.unwrap_or(
            to - Duration::from_secs(86_400).min(to.duration_since(UNIX_EPOCH).unwrap_or_default()),
        );
        if from >= to {
            return Err(bad("from", "must be before to".to_string()));
        }
        // Hours that overlap the range; none older than what is kept.
        let oldest = ledger::hour_of(now).saturating_sub(retention.as_secs() / 3600);
        // No figures are kept for hours to come.
        let to_hour =
            (ledger::hour_of(to - Duration::from_nanos(1)) + 1).min(ledger::hour_of(now) + 1);
        let from_hour = ledger::hour_of(from).max(oldest).min(to_hour);
        grouping.hour = interval != Interval::Total;
        Ok(Query {
            from: from_hour,
            to: to_hour,
            grouping,
            interval,
            csv,
        })
    }
}

fn rfc3339(hour: Hour) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(hour * 3600)).to_string()
}

/// A cost in billionths, as an exact decimal.
fn decimal(nanos: u64) -> String {
    let s = format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A tally's figures, as the report names them.
fn figures(t: &Tally) -> [(&'static str, u64); 7] {
    [
        ("requests", t.requests),
        ("prompt_tokens", t.prompt_tokens),
        ("completion_tokens", t.completion_tokens),
        ("total_tokens", t.tokens()),
        ("cached_tokens", t.cached_tokens),
        ("reasoning_tokens", t.reasoning_tokens),
        ("audio_tokens", t.audio_tokens),
    ]
}

fn line_json(l: &Line, interval: Interval) -> Value {
    let mut v = json!({});
    if let Some(h) = l.hour {
        v["start"] = rfc3339(h).into();
        let length = if interval == Interval::Day { 24 } else { 1 };
        v["end"] = rfc3339(h + length).into();
    }
    if let Some(c) = &l.consumer {
        v["consumer"] = (**c).into();
    }
    if let Some(d) = &l.deployment {
        v["deployment"] = (**d).into();
    }
    for (name, n) in figures(&l.tally) {
        v[name] = n.into();
    }
    v["cost"] = l.tally.cost().into();
    v
}

/// A CSV field, quoted when it holds a comma, a quote or a line break (RFC 4180); a leading
/// formula character is escaped so a spreadsheet shows the name rather than running it.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) && s != "-" {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

fn render(q: &Query, lines: &[Line], currency: &str) -> (String, &'static str) {
    if q.csv {
        let mut out = String::new();
        let mut head = Vec::new();
        if q.grouping.hour {
            head.extend(["start", "end"]);
        }
        if q.grouping.consumer {
            head.push("consumer");
        }
        if q.grouping.deployment {
            head.push("deployment");
        }
        head.extend(figures(&Tally::default()).map(|(n, _)| n));
        let cost = format!("cost_{}", currency.to_ascii_lowercase());
        head.push(&cost);
        out.push_str(&head.join(","));
        out.push_str("\r\n");
        for l in lines {
            let mut row: Vec<String> = Vec::new();
            if let Some(h) = l.hour {
                let length = if q.interval == Interval::Day { 24 } else { 1 };
                row.push(rfc3339(h));
                row.push(rfc3339(h + length));
            }
            row.extend(l.consumer.as_deref().map(csv_field));
            row.extend(l.deployment.as_deref().map(csv_field));
            row.extend(figures(&l.tally).map(|(_, n)| n.to_string()));
            row.push(decimal(l.tally.cost_nanos));
            let _ = write!(out, "{}\r\n", row.join(","));
        }
        return (out, "text/csv; charset=utf-8");
    }
    let mut total = Tally::default();
    for l in lines {
        total.add(&l.tally);
    }
    let mut group_by = Vec::new();
    if q.grouping.consumer {
        group_by.push("consumer");
    }
    if q.grouping.deployment {
        group_by.push("deployment");
    }
    let total_line = Line {
        hour: None,
        consumer: None,
        deployment: None,
        tally: total,
    };
    let v = json!({
        "object": "usage_report",
        "from": rfc3339(q.from),
        "to": rfc3339(q.to),
        "interval": q.interval.as_str(),
        "group_by": group_by,
        "currency": currency,
        "data": lines.iter().map(|l| line_json(l, q.interval)).collect::<Vec<_>>(),
        "total": line_json(&total_line, q.interval),
    });
    (v.to_string(), "application/json")
}

/// Every replica's entries (from the shared store) or this gateway's.
async fn entries(state: &AdminState, from: Hour, to: Hour) -> Result<Vec<Entry>, GatewayError> {
    match &state.shared {
        Some(shared) => shared.usage(from, to).await.map_err(unreachable),
        None => Ok(state.metrics.ledger.entries(from, to)),
    }
}

fn unreachable(e: String) -> GatewayError {
    GatewayError::new(
        ErrorKind::NoBackendAvailable,
        format!("the limits store, which keeps the usage figures, is unreachable: {e}"),
    )
    .with_retry_after(Some(Duration::from_secs(5)))
}

/// `GET /admin/usage`: the body and its content type, or what is wrong with the query.
pub async fn report(
    state: &AdminState,
    rt: &Snapshot,
    query: Option<&str>,
) -> Result<(String, &'static str), GatewayError> {
    let now = SystemTime::now();
    let q = Query::parse(query, now, state.metrics.ledger.retention())?;
    let mut entries = entries(state, q.from, q.to).await?;
    if q.interval == Interval::Day {
        for e in &mut entries {
            e.hour -= e.hour % 24;
        }
    }
    let lines = ledger::group(&entries, q.grouping);
    Ok(render(&q, &lines, &rt.config.usage.currency))
}

/// The consumers view: each consumer's requests, tokens and cost this UTC day and month, and
/// its budget as it stands. Consumers the config lists come first, in its order, then any
/// other name the figures hold (`-`: callers without a consumer).
pub async fn consumers(state: &AdminState, rt: &Snapshot) -> Value {
    let now = SystemTime::now();
    let hour = ledger::hour_of(now);
    let month_start = crate::limits::window_start(QuotaPeriod::Month, now) / 3600;
    let figures = match &state.shared {
        Some(shared) => shared.usage_periods(hour).await,
        None => {
            let l = &state.metrics.ledger;
            Ok((
                l.entries(hour - hour % 24, hour + 1),
                l.entries(month_start, hour + 1),
            ))
        }
    };
    let (day, month, error) = match figures {
        Ok((d, m)) => (d, m, None),
        Err(e) => (Vec::new(), Vec::new(), Some(e)),
    };
    let by = Grouping {
        consumer: true,
        ..Grouping::default()
    };
    let (day, month) = (ledger::group(&day, by), ledger::group(&month, by));
    let budgets = rt.limiter.budgets(now).await;
    let mut names: Vec<Arc<str>> = rt
        .config
        .consumers
        .iter()
        .map(|c| Arc::from(c.name.as_str()))
        .collect();
    for l in day.iter().chain(&month) {
        if let Some(c) = &l.consumer
            && !names.contains(c)
        {
            names.push(c.clone());
        }
    }
    let of = |lines: &[Line], name: &str| {
        let t = lines
            .iter()
            .find(|l| l.consumer.as_deref() == Some(name))
            .map(|l| l.tally)
            .unwrap_or_default();
        json!({"requests": t.requests, "tokens": t.tokens(), "cost": t.cost()})
    };
    let list: Vec<Value> = names
        .iter()
        .map(|name| {
            let budget = budgets.as_ref().ok().and_then(|b| {
                b.iter().find(|b| *b.consumer == **name).map(|b| {
                    json!({
                        "period": b.period.as_str(),
                        "amount": b.amount as f64 / 1e6,
                        "spent": b.spent as f64 / 1e6,
                        "left": b.amount.saturating_sub(b.spent) as f64 / 1e6,
                    })
                })
            });
            json!({
                "name": &**name,
                "today": of(&day, name),
                "month": of(&month, name),
                "budget": budget,
            })
        })
        .collect();
    json!({
        "currency": rt.config.usage.currency,
        "list": list,
        "error": error.or(budgets.err()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> SystemTime {
        humantime::parse_rfc3339(s).unwrap()
    }

    const DAY35: Duration = Duration::from_secs(35 * 86_400);

    #[test]
    fn a_query_names_hours_and_what_to_group_by() {
        let now = at("2026-12-03T10:30:00Z");
        let h = |s| ledger::hour_of(at(s));
        let q = Query::parse(None, now, DAY35).unwrap();
        assert_eq!(
            (q.from, q.to),
            (h("2026-12-02T10:00:00Z"), h("2026-12-03T11:00:00Z"))
        );
        assert_eq!(q.interval, Interval::Hour);
        assert!(q.grouping.consumer && q.grouping.deployment && q.grouping.hour && !q.csv);

        let q = Query::parse(
            Some("from=2026-12-01&to=2026-12-02T00%3A00%3A00Z&group_by=consumer&format=csv&interval=total"),
            now,
            DAY35,
        )
        .unwrap();
        assert_eq!(
            (q.from, q.to),
            (h("2026-12-01T00:00:00Z"), h("2026-12-02T00:00:00Z"))
        );
        assert!(q.grouping.consumer && !q.grouping.deployment && !q.grouping.hour && q.csv);
        // Older than what is kept: from the oldest hour kept; nothing is kept to come.
        let q = Query::parse(Some("from=1700000000&to=9999-12-31&group_by="), now, DAY35).unwrap();
        assert_eq!(q.from, h("2026-10-29T10:00:00Z"));
        assert_eq!(q.to, h("2026-12-03T11:00:00Z"));
        assert!(!q.grouping.consumer && !q.grouping.deployment);

        for (query, param) in [
            ("from=yesterday", "from"),
            ("to=2026-13-01", "to"),
            ("group_by=team", "group_by"),
            ("format=xml", "format"),
            ("interval=week", "interval"),
            ("from=2026-12-02&to=2026-12-01", "from"),
            ("frm=2026-12-01", "frm"),
        ] {
            let e = Query::parse(Some(query), now, DAY35).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest);
            assert!(
                e.message.contains(&format!("parameter {param}:")),
                "{query}: {}",
                e.message
            );
        }
    }

    #[test]
    fn costs_print_exactly_and_names_are_safe_in_csv() {
        assert_eq!(decimal(1_234_500_000), "1.2345");
        assert_eq!(decimal(7), "0.000000007");
        assert_eq!(decimal(2_000_000_000), "2");
        assert_eq!(decimal(0), "0");
        assert_eq!(csv_field("team, a"), "\"team, a\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("-"), "-");
    }

    #[test]
    fn a_csv_report_has_a_line_per_group_and_hour() {
        let q = Query::parse(
            Some("from=2026-12-03T00:00:00Z&to=2026-12-03T02:00:00Z&format=csv"),
            at("2026-12-03T10:00:00Z"),
            DAY35,
        )
        .unwrap();
        let entry = |hour, consumer: &str| Entry {
            hour,
            consumer: consumer.into(),
            deployment: "gpt-4o".into(),
            tally: Tally {
                requests: 2,
                prompt_tokens: 30,
                completion_tokens: 5,
                cached_tokens: 10,
                cost_nanos: 1_500,
                ..Tally::default()
            },
        };
        let lines = ledger::group(&[entry(q.from, "a, b"), entry(q.from + 1, "c")], q.grouping);
        let (body, ct) = render(&q, &lines, "EUR");
        assert_eq!(ct, "text/csv; charset=utf-8");
        let rows: Vec<&str> = body.split("\r\n").collect();
        assert_eq!(
            rows[0],
            "start,end,consumer,deployment,requests,prompt_tokens,completion_tokens,total_tokens,cached_tokens,reasoning_tokens,audio_tokens,cost_eur"
        );
        assert_eq!(
            rows[1],
            "2026-12-03T00:00:00Z,2026-12-03T01:00:00Z,\"a, b\",gpt-4o,2,30,5,35,10,0,0,0.0000015"
        );
        assert!(rows[2].starts_with("2026-12-03T01:00:00Z,2026-12-03T02:00:00Z,c,"));
        assert_eq!(rows.len(), 4, "{body}");
    }
}
