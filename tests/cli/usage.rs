//! The usage report agrees with the access log and the metrics, to the token and the cent.

use std::collections::BTreeMap;

use super::*;

/// Requests, each token kind and cost, by (consumer, deployment).
type Sums = BTreeMap<(String, String), [f64; 7]>;

const FIGURES: [&str; 6] = [
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "audio_tokens",
];

/// A recorded run of many kinds of requests by two consumers, one caller without a key and
/// some the gateway refused itself: `GET /admin/usage` adds up to what the access log's lines
/// add up to, consumer by consumer and deployment by deployment, in JSON and in CSV, and the
/// token and cost metrics agree too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_usage_report_adds_up_to_the_access_log_and_the_metrics() {
    let sim = common::start_sim(common::sim("east")).await;
    let cfg = format!(
        r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[routing]
unknown_deployments = "reject"

[usage]
currency = "EUR"

[[backends]]
name = "east"
url = "{}"
auth = {{ type = "api_key", key = "key-east" }}

[[deployments]]
name = "gpt-4o"
backends = {{ east = "gpt-4o" }}
price = {{ input = 2.50, cached_input = 1.25, output = 10.00 }}

[[deployments]]
name = "o3"
backends = {{ east = "o3-mini" }}
price = {{ input = 1.10, output = 4.40 }}

[[deployments]]
name = "audio"
backends = {{ east = "gpt-4o-audio-preview" }}
price = {{ input = 2.50, output = 40.00 }}

[[deployments]]
name = "embed"
backends = {{ east = "text-embedding-3-large" }}
price = {{ input = 0.13, output = 0 }}

[[consumers]]
name = "team-a"
key = "team-a-key-0123456789"

[[consumers]]
name = "team-b"
key = "team-b-key-0123456789"
"#,
        sim.url()
    );
    let p = write_config(&tmp("usage-report"), &cfg);
    let (mut child, mut lines) = serve_json_logs(&p);
    let listening = next_message(&mut lines, "switchyard listening").await;
    let addr = listening["addr"].as_str().unwrap().to_string();
    // `Some(127.0.0.1:port)`, as the log line debug-prints it.
    let admin = listening["admin"]
        .as_str()
        .unwrap()
        .trim_start_matches("Some(")
        .trim_end_matches(')')
        .to_string();
    let client = common::client();
    let long = "Tell me about the sea and the ships upon it. ".repeat(120);
    let chat = |stream: bool, content: &str| {
        serde_json::json!({
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 12,
            "stream": stream,
        })
    };
    let sends: Vec<(Option<&str>, &str, &str, serde_json::Value)> = vec![
        (
            Some("team-a"),
            "gpt-4o",
            "chat/completions",
            chat(false, &long),
        ),
        (
            Some("team-a"),
            "gpt-4o",
            "chat/completions",
            chat(false, &long),
        ),
        (
            Some("team-a"),
            "gpt-4o",
            "chat/completions",
            chat(true, &long),
        ),
        (
            Some("team-a"),
            "gpt-4o",
            "chat/completions",
            chat(true, "Hi"),
        ),
        (
            Some("team-a"),
            "o3",
            "chat/completions",
            chat(false, "Think."),
        ),
        (
            Some("team-a"),
            "o3",
            "chat/completions",
            chat(true, "Think more."),
        ),
        (
            Some("team-a"),
            "embed",
            "embeddings",
            serde_json::json!({"input": ["one", "two three"]}),
        ),
        (
            Some("team-b"),
            "audio",
            "chat/completions",
            chat(false, "Say hi"),
        ),
        (
            Some("team-b"),
            "audio",
            "chat/completions",
            chat(true, "Say bye"),
        ),
        (
            Some("team-b"),
            "gpt-4o",
            "chat/completions",
            chat(false, &long),
        ),
        (
            Some("team-b"),
            "nope",
            "chat/completions",
            chat(false, "404"),
        ),
        (None, "gpt-4o", "chat/completions", chat(false, "401")),
    ];
    for (consumer, deployment, op, body) in &sends {
        let mut r = client
            .post(format!(
                "http://{addr}/openai/deployments/{deployment}/{op}?api-version=2024-10-21"
            ))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(c) = consumer {
            r = r.header("api-key", format!("{c}-key-0123456789"));
        }
        let r = r.send().await.unwrap();
        let want = match (consumer, *deployment) {
            (None, _) => 401,
            (_, "nope") => 404,
            _ => 200,
        };
        assert_eq!(r.status(), want, "{deployment}");
        let _ = r.bytes().await.unwrap();
    }

    // The access log's lines, added up. A deployment the config does not list is counted as
    // `other` (as in the metrics), so that names made up by callers cannot grow the figures.
    let mut logged = Sums::new();
    let mut seen = 0;
    while seen < sends.len() {
        let line = lines.next_line().await.unwrap().expect("an access line");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["target"] != "switchyard::access" {
            continue;
        }
        seen += 1;
        let deployment = match v["deployment"].as_str().unwrap() {
            "nope" => "other",
            d => d,
        };
        let sums = logged
            .entry((
                v["consumer"].as_str().unwrap().to_string(),
                deployment.to_string(),
            ))
            .or_default();
        sums[0] += 1.0;
        for (i, f) in FIGURES.iter().enumerate().skip(1) {
            sums[i] += v[f].as_f64().unwrap_or(0.0);
        }
        sums[6] += v["cost"].as_f64().unwrap_or(0.0);
    }
    assert!(
        logged[&("team-a".into(), "o3".into())][4] > 0.0,
        "reasoning tokens: {logged:?}"
    );
    assert!(
        logged[&("team-b".into(), "audio".into())][5] > 0.0,
        "audio tokens: {logged:?}"
    );
    assert!(
        logged[&("team-a".into(), "gpt-4o".into())][3] > 0.0,
        "cached tokens: {logged:?}"
    );

    let report: serde_json::Value = client
        .get(format!("http://{admin}/admin/usage?interval=total"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["currency"], "EUR");
    let mut reported = Sums::new();
    for row in report["data"].as_array().unwrap() {
        let mut sums = [0.0; 7];
        for (i, f) in FIGURES.iter().enumerate() {
            sums[i] = row[f].as_f64().unwrap();
        }
        sums[6] = row["cost"].as_f64().unwrap();
        let key = (
            row["consumer"].as_str().unwrap().to_string(),
            row["deployment"].as_str().unwrap().to_string(),
        );
        reported.insert(key, sums);
    }
    assert_eq!(
        reported.keys().collect::<Vec<_>>(),
        logged.keys().collect::<Vec<_>>(),
        "{report}"
    );
    for (key, want) in &logged {
        let got = reported[key];
        assert_eq!(got[..6], want[..6], "{key:?}: {report}");
        assert!((got[6] - want[6]).abs() < 1e-6, "{key:?}: {got:?} {want:?}");
    }
    let total_requests = report["total"]["requests"].as_u64().unwrap();
    assert_eq!(total_requests as usize, sends.len());

    // The same, hour by hour, as CSV.
    let csv = client
        .get(format!(
            "http://{admin}/admin/usage?format=csv&group_by=consumer"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    let csv = csv.text().await.unwrap();
    let mut rows = csv.lines();
    let head: Vec<&str> = rows.next().unwrap().split(',').collect();
    assert_eq!(head[..3], ["start", "end", "consumer"], "{csv}");
    assert_eq!(head.last(), Some(&"cost_eur"));
    let col = |name: &str| head.iter().position(|h| *h == name).unwrap();
    let mut team_a = [0.0; 2];
    for row in rows {
        let cells: Vec<&str> = row.split(',').collect();
        if cells[col("consumer")] == "team-a" {
            team_a[0] += cells[col("prompt_tokens")].parse::<f64>().unwrap();
            team_a[1] += cells[col("cost_eur")].parse::<f64>().unwrap();
        }
    }
    let logged_a: [f64; 2] = logged
        .iter()
        .filter(|((c, _), _)| c == "team-a")
        .fold([0.0; 2], |acc, (_, s)| [acc[0] + s[1], acc[1] + s[6]]);
    assert_eq!(team_a[0], logged_a[0], "{csv}");
    assert!((team_a[1] - logged_a[1]).abs() < 1e-6, "{csv}");

    // And the metrics.
    let m = common::metrics_text(&client, &format!("http://{admin}")).await;
    for ((consumer, deployment), want) in &logged {
        let cost = common::metric_in(
            &m,
            &format!(r#"switchyard_cost_total{{consumer="{consumer}",deployment="{deployment}"}}"#),
        );
        assert!(
            (cost - want[6]).abs() < 1e-6,
            "{consumer} {deployment}: {cost} {want:?}"
        );
        let prompt: f64 = m
            .lines()
            .filter(|l| {
                l.starts_with("switchyard_tokens_total{")
                    && l.contains(&format!(r#"deployment="{deployment}""#))
                    && l.contains(&format!(r#"consumer="{consumer}""#))
                    && l.contains(r#"kind="prompt""#)
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum();
        assert_eq!(prompt, want[1], "{consumer} {deployment}: {m}");
    }
    let _ = child.kill().await;
}
