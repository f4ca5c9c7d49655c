//! The live status page, end to end: a real headless Chromium, driven through ChromeDriver,
//! opens the admin listener's `/` on a gateway under traffic, enters the admin key, and must
//! show each backend's live figures, charts that have data, and numbers that move as traffic
//! goes on.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests fail loudly by design, and print what they measured"
)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const ADMIN_KEY: &str = "status-page-admin-key-0123456789";

/// ChromeDriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    url: String,
    profile: std::path::PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// `None` (said loudly) when Chromium is not installed outside CI; in CI it must be.
async fn driver() -> Option<Driver> {
    if !std::path::Path::new(CHROMIUM).exists() || !std::path::Path::new(CHROMEDRIVER).exists() {
        assert!(
            std::env::var("CI").is_err(),
            "chromium and chromium-driver are not installed (CI installs them in .ci/run)"
        );
        eprintln!(
            "\n*** SKIPPED: `apt-get install chromium chromium-driver` to run the status page test ***\n"
        );
        return None;
    }
    let port = free_port();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let profile = std::env::temp_dir().join(format!("switchyard-chromium-{}", std::process::id()));
    let d = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
        profile,
    };
    let client = client();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client.get(format!("{}/status", d.url)).send().await
            && r.json_value().await["value"]["ready"] == true
        {
            return Some(d);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "chromedriver did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One WebDriver session: a headless Chromium.
struct Session {
    client: reqwest::Client,
    base: String,
}

impl Session {
    async fn new(d: &Driver) -> Session {
        let client = client();
        // The flags keep Chromium off the network it cannot reach here (updates, sync, QUIC).
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                         "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync",
                         "--window-size=1500,700",
                         format!("--user-data-dir={}", d.profile.display())],
            }
        }}});
        let v = client
            .post(format!("{}/session", d.url))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json_value()
            .await;
        let id = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        Session {
            client,
            base: format!("{}/session/{id}", d.url),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let v = self
            .client
            .request(method, format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json_value()
            .await;
        assert!(
            v["value"]["error"].is_null(),
            "webdriver {path} failed: {v}"
        );
        v["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await;
    }

    async fn script(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    async fn element(&self, css: &str) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(|v| v.as_str())
            .unwrap()
            .to_string()
    }

    async fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine;
        let v = self
            .client
            .get(format!("{}/screenshot", self.base))
            .send()
            .await
            .unwrap()
            .json_value()
            .await;
        if let Some(png) = v["value"].as_str()
            && let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(png)
        {
            let _ = std::fs::write(path, bytes);
        }
    }

    async fn close(self) {
        let _ = self.client.delete(&self.base).send().await;
    }
}

/// What the page shows per backend row.
const READ_ROWS: &str = r#"
return [...document.querySelectorAll("tr[data-backend]")].map((tr) => ({
  name: tr.dataset.backend,
  state: tr.dataset.state,
  requests: Number(tr.dataset.requests),
  share: tr.dataset.share,
  throttled: Number(tr.dataset.throttled),
  tokens: Number(tr.dataset.tokens),
  text: tr.innerText,
  requests_chart: tr.querySelector("svg[data-chart=requests] polyline").getAttribute("points"),
  latency_chart: tr.querySelector("svg[data-chart=latency] polyline").getAttribute("points"),
}));
"#;

async fn rows_until(s: &Session, what: &str, mut ok: impl FnMut(&[Value]) -> bool) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let rows = s.script(READ_ROWS).await;
        let rows = rows.as_array().cloned().unwrap_or_default();
        if ok(&rows) {
            return rows;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page never showed {what}: {rows:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const TEAM_KEY: &str = "team-a-key-0123456789";

/// A chat completion as the consumer `team-a`: what it used and cost is summed as it goes.
async fn chat_as_team(client: &reqwest::Client, base: &str) -> reqwest::Response {
    client
        .post(format!("{base}{CHAT}"))
        .header("content-type", "application/json")
        .header("api-key", TEAM_KEY)
        .body(chat_body(false))
        .send()
        .await
        .unwrap()
}

/// The consumers view's rows, as the page shows them.
const READ_CONSUMERS: &str = r##"
return [...document.querySelectorAll("#consumers tbody tr")].map((tr) => ({
  name: tr.dataset.consumer,
  requests: Number(tr.dataset.requests),
  tokens: Number(tr.dataset.tokens),
  cost: Number(tr.dataset.cost),
  budget_left: Number(tr.dataset.budgetLeft),
  text: tr.innerText,
}));
"##;

fn row<'a>(rows: &'a [Value], name: &str) -> &'a Value {
    rows.iter().find(|r| r["name"] == name).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_live_backend_data_in_chromium() {
    let Some(driver) = driver().await else {
        return;
    };
    // PTU first; it runs out of requests and cools down, pay-as-you-go takes the rest. One
    // request a minute makes the simulator ask for 60 s, the longest cooldown the gateway keeps,
    // so the page still shows it however slowly the browser starts (4 a minute gave 15 s, and a
    // slow CI machine's browser took longer than that).
    let ptu = start_sim(switchyard::sim::SimConfig {
        requests_per_minute: Some(1),
        ..sim("ptu")
    })
    .await;
    let paygo = start_sim(sim("paygo")).await;
    // One priced deployment and a consumer with a budget, for the consumers view.
    let gw = gateway_with(
        &[
            B::sim(&ptu).with("priority = 1"),
            B::sim(&paygo).with("priority = 2"),
        ],
        "",
        &format!("admin_key = \"{ADMIN_KEY}\""),
        &format!(
            "[[deployments]]\nname = \"gpt-4o\"\nbackends = {{ ptu = \"gpt-4o\", paygo = \"gpt-4o\" }}\nprice = {{ input = 2.50, output = 10.00 }}\n\n[[consumers]]\nname = \"team-a\"\nkey = \"{TEAM_KEY}\"\nbudget = {{ period = \"day\", amount = 1.0 }}\n"
        ),
    )
    .await;
    let client = client();
    let mut served = std::collections::HashMap::<String, u64>::new();
    for _ in 0..12 {
        let r = chat_as_team(&client, &gw.base).await;
        assert_eq!(r.status(), 200);
        *served
            .entry(header(&r, "x-switchyard-backend"))
            .or_default() += 1;
    }
    let (by_ptu, by_paygo) = (served["ptu"], served["paygo"]);
    assert!(by_ptu > 0 && by_paygo > 0, "{served:?}");

    let s = Session::new(&driver).await;
    s.go(&format!("{}/", gw.admin)).await;
    // Without the key the page asks for it, and shows no data.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while s
        .script("return getComputedStyle(document.getElementById('key')).display")
        .await
        != "block"
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the key form never showed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let input = s.element("#keyinput").await;
    s.call(
        reqwest::Method::POST,
        &format!("/element/{input}/value"),
        json!({ "text": ADMIN_KEY }),
    )
    .await;
    let button = s.element("#key button").await;
    s.call(
        reqwest::Method::POST,
        &format!("/element/{button}/click"),
        json!({}),
    )
    .await;

    let rows = rows_until(&s, "both backends with traffic", |rows| {
        rows.len() == 2 && rows.iter().all(|r| r["requests"].as_u64() > Some(0))
    })
    .await;
    let (p, g) = (row(&rows, "ptu"), row(&rows, "paygo"));
    // What the clients saw, to the request.
    assert_eq!(p["requests"], by_ptu, "{p}");
    assert_eq!(g["requests"], by_paygo, "{g}");
    let share = format!("{:.1}", by_ptu as f64 * 100.0 / 12.0);
    assert_eq!(p["share"], share.as_str(), "{p}");
    assert_eq!(p["throttled"], 1, "one 429 before the cooldown: {p}");
    assert_eq!(p["state"], "cooling_down", "{p}");
    assert!(p["text"].as_str().unwrap().contains("cooling down"), "{p}");
    assert!(g["tokens"].as_u64().unwrap() > 0, "{g}");
    for r in [p, g] {
        let points = r["requests_chart"].as_str().unwrap();
        assert!(points.split(' ').count() >= 2, "a drawn chart: {r}");
        assert!(!r["latency_chart"].as_str().unwrap().is_empty(), "{r}");
    }

    // More traffic: the figures move without a reload of the page.
    for _ in 0..10 {
        assert_eq!(chat_as_team(&client, &gw.base).await.status(), 200);
    }
    rows_until(&s, "the new requests", |rows| {
        rows.iter()
            .any(|r| r["name"] == "paygo" && r["requests"] == by_paygo + 10)
    })
    .await;
    // The consumers view: every request of the day, its tokens and cost, and the budget left.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let consumers = loop {
        let c = s.script(READ_CONSUMERS).await;
        if c[0]["requests"] == 22 {
            break c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the consumers view never showed 22 requests: {c}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let status: Value = client
        .get(format!("{}/admin/status", gw.admin))
        .header("x-admin-key", ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let today = &status["consumers"]["list"][0]["today"];
    assert_eq!(today["requests"], 22, "{status}");
    let cost = today["cost"].as_f64().unwrap();
    assert!(cost > 0.0, "{status}");
    let team = &consumers[0];
    assert_eq!(team["name"], "team-a", "{consumers}");
    assert_eq!(team["tokens"], today["tokens"], "{consumers}");
    assert!(
        (team["cost"].as_f64().unwrap() - cost).abs() < 1e-12,
        "{consumers}"
    );
    assert!(
        (team["budget_left"].as_f64().unwrap() - (1.0 - cost)).abs() < 2e-6,
        "{consumers}"
    );
    assert!(
        team["text"].as_str().unwrap().contains("of 1.00 this day"),
        "{consumers}"
    );
    let header = s
        .script("return document.querySelector('header').innerText")
        .await;
    assert!(header.as_str().unwrap().contains("generation"), "{header}");
    s.screenshot(&std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png"))
        .await;
    s.close().await;
    gw.stop().await;
}
