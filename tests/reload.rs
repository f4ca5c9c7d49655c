//! Hot reload: a new config is swapped in without failing a request, an invalid one is refused
//! while the old one serves, and what the gateway learned about unchanged backends survives.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests fail loudly by design, and print what they measured"
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;

async fn reload(client: &reqwest::Client, admin: &str) -> (u16, serde_json::Value) {
    let r = client
        .post(format!("{admin}/admin/reload"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json_value().await)
}

async fn backends(client: &reqwest::Client, admin: &str) -> serde_json::Value {
    client
        .get(format!("{admin}/admin/backends"))
        .send()
        .await
        .unwrap()
        .json_value()
        .await
}

/// The state of `backend` for `deployment` in `/admin/backends`.
fn pair<'a>(
    status: &'a serde_json::Value,
    backend: &str,
    deployment: &str,
) -> Option<&'a serde_json::Value> {
    status["backends"]
        .as_array()?
        .iter()
        .find(|b| b["name"] == backend)?["deployments"]
        .as_array()?
        .iter()
        .find(|d| d["deployment"] == deployment)
}

/// Waits (bounded) until `cond` holds, looking every few milliseconds.
async fn until<F: AsyncFnMut() -> bool>(what: &str, mut cond: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_load_fail_no_request() {
    let (_sims, b) = start_sims(&["a", "b", "c"]).await;
    let [a, bb, c] = [&b[0], &b[1], &b[2]];
    let cfg = |backends: &[&B], routing: &str| {
        let list: Vec<B> = backends
            .iter()
            .map(|x| B {
                name: x.name.clone(),
                url: x.url.clone(),
                key: x.key.clone(),
                extra: x.extra.clone(),
            })
            .collect();
        config_text(&list, routing, "", "")
    };
    let ghost = B::dead("ghost");
    let weighted_c = B {
        name: c.name.clone(),
        url: c.url.clone(),
        key: c.key.clone(),
        extra: "weight = 3\n".into(),
    };
    let variants: Vec<(String, Option<&str>)> = vec![
        (cfg(&[a, bb, c], "strategy = \"least_inflight\""), None),
        (
            "[server]\nlisten = \"127.0.0.1:0\"\n[[backends]\nname = \"x\"".into(),
            Some("invalid TOML"),
        ),
        (cfg(&[bb, &weighted_c], "strategy = \"weighted\""), None),
        (
            cfg(&[a], "strategy = \"round_robin\"").replace(&a.url, "ftp://nowhere"),
            Some("backends[0].url"),
        ),
        // A dead backend joins: its failures are absorbed by failover.
        (cfg(&[&ghost, a, c], "strategy = \"round_robin\""), None),
        (
            cfg(
                &[a, bb],
                "strategy = \"round_robin\"\nstrategyy = \"latency\"",
            ),
            Some("strategyy"),
        ),
        (
            cfg(&[a, bb], "strategy = \"latency\"\nmax_attempts = 3"),
            None,
        ),
    ];
    let file = ConfigFile::new(&cfg(&[a, bb], "strategy = \"round_robin\""));
    let gw = gateway_from_file(&file, None).await;
    let client = client();

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut load = tokio::task::JoinSet::new();
    for worker in 0..6 {
        let (stop, done, failures) = (stop.clone(), done.clone(), failures.clone());
        let (client, base) = (client.clone(), gw.base.clone());
        load.spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let stream = (i + worker).is_multiple_of(3);
                let r = send_chat(&client, &base, stream).await;
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                let ok = status == 200 && (!stream || body.trim_end().ends_with("data: [DONE]"));
                if !ok {
                    failures.lock().unwrap().push(format!(
                        "{status} stream={stream}: {}",
                        body.chars().take(200).collect::<String>()
                    ));
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    let (mut applied, mut rejected) = (0, 0);
    for i in 0..20 {
        // Some traffic between reloads, so each swap happens with requests in flight.
        let before = done.load(Ordering::Relaxed);
        until("traffic between reloads", async || {
            done.load(Ordering::Relaxed) >= before + 15
        })
        .await;
        let (text, invalid) = &variants[i % variants.len()];
        file.write(text);
        let (status, body) = reload(&client, &gw.admin).await;
        match invalid {
            None => {
                assert_eq!(status, 200, "reload {i}: {body}");
                applied += 1;
                assert_eq!(body["generation"], 1 + applied, "{body}");
            }
            Some(field) => {
                assert_eq!(status, 422, "reload {i} must be refused: {body}");
                let msg = body["error"]["message"].as_str().unwrap();
                assert!(msg.contains(field), "the error names {field}: {msg}");
                rejected += 1;
            }
        }
    }
    let before = done.load(Ordering::Relaxed);
    until("traffic after the last reload", async || {
        done.load(Ordering::Relaxed) >= before + 15
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    while load.join_next().await.is_some() {}

    let failures = failures.lock().unwrap().clone();
    let total = done.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed: {failures:?}",
        failures.len()
    );
    assert!(total >= 300, "only {total} requests ran");
    assert_eq!((applied, rejected), (11, 9));

    let metrics = metrics_text(&client, &gw.admin).await;
    for (line, want) in [
        (
            "switchyard_config_reloads_total{result=\"applied\",trigger=\"admin\"}",
            11,
        ),
        (
            "switchyard_config_reloads_total{result=\"rejected\",trigger=\"admin\"}",
            9,
        ),
        ("switchyard_config_generation", 12),
        ("switchyard_in_flight_requests", 0),
    ] {
        let got = metrics
            .lines()
            .find(|l| l.starts_with(line))
            .unwrap_or_else(|| panic!("no {line} in\n{metrics}"));
        assert!(got.ends_with(&format!(" {want}")), "{got}, want {want}");
    }
    // Every lease of every generation ended where the backends' state lives now.
    let status = backends(&client, &gw.admin).await;
    for b in status["backends"].as_array().unwrap() {
        for d in b["deployments"].as_array().unwrap() {
            assert_eq!(d["in_flight"], 0, "{b}");
        }
    }
    gw.stop().await;
}

#[tokio::test]
async fn unchanged_backends_keep_their_health_changed_ones_start_fresh() {
    let (throttler, _t) = scripted_backend(429, vec![("retry-after", "3600".to_string())]).await;
    let good = start_sim(sim("good")).await;
    let extra = start_sim(sim("extra")).await;
    let first = B::url("first", throttler.clone()).with("priority = 1");
    let good_b = B::sim(&good).with("priority = 2");
    let file = ConfigFile::new(&config_text(&[first, good_b], "", "", ""));
    let gw = gateway_from_file(&file, None).await;
    let client = client();

    // The priority backend throttles: it cools down for an hour, the request fails over.
    let r = post_chat(&client, &gw.base).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-backend"), "good");
    assert_eq!(header(&r, "x-switchyard-attempts"), "2");

    // A reload that adds a backend and re-weights another leaves `first` as it was.
    let first = B::url("first", throttler.clone()).with("priority = 1");
    let good_b = B::sim(&good).with("priority = 2\nweight = 5");
    let extra_b = B::sim(&extra).with("priority = 3");
    file.write(&config_text(&[first, good_b, extra_b], "", "", ""));
    let (status, body) = reload(&client, &gw.admin).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["backends"]["kept"],
        serde_json::json!(["first", "good"])
    );
    assert_eq!(body["backends"]["added"], serde_json::json!(["extra"]));
    let st = backends(&client, &gw.admin).await;
    let p = pair(&st, "first", "gpt-4o").expect("first's state carried over");
    assert_eq!(p["state"], "cooling_down", "{st}");
    // Capped by routing.max_cooldown (60 s); a fresh start would say 0.
    assert!(p["available_in_ms"].as_u64().unwrap() > 50_000, "{p}");
    assert!(
        st["backends"][0]["last_error"].is_object(),
        "the latest failure carried over: {st}"
    );
    // Still cooling: straight to `good`, no attempt wasted on `first`.
    let r = post_chat(&client, &gw.base).await;
    assert_eq!(header(&r, "x-switchyard-backend"), "good");
    assert_eq!(header(&r, "x-switchyard-attempts"), "1");

    // Pointing `first` at a working endpoint makes it a new backend: fresh health, traffic again.
    let first = B::sim(&extra).with("priority = 1");
    let first = B {
        name: "first".into(),
        ..first
    };
    file.write(&config_text(
        &[first, B::sim(&good).with("priority = 2")],
        "",
        "",
        "",
    ));
    let (status, body) = reload(&client, &gw.admin).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["backends"]["added"], serde_json::json!(["first"]));
    assert_eq!(
        body["backends"]["removed"],
        serde_json::json!(["first", "extra"])
    );
    let r = post_chat(&client, &gw.base).await;
    assert_eq!(header(&r, "x-switchyard-backend"), "first");
    assert_eq!(header(&r, "x-switchyard-attempts"), "1");
    gw.stop().await;
}

#[tokio::test]
async fn consumer_limits_are_not_reset_by_a_reload() {
    const KEY: &str = "team-key-0123456789abcdef";
    let chat = async |client: &reqwest::Client, base: &str| {
        client
            .post(format!("{base}{CHAT}"))
            .header("api-key", KEY)
            .body(chat_body(false))
            .send()
            .await
            .unwrap()
    };
    let s = start_sim(sim("a")).await;
    let consumer = |rpm: u32| {
        format!("\n[[consumers]]\nname = \"team\"\nkey = \"{KEY}\"\nrequests_per_minute = {rpm}\n")
    };
    let file = ConfigFile::new(&config_text(&[B::sim(&s)], "", "", &consumer(2)));
    let gw = gateway_from_file(&file, None).await;
    let client = client();
    for _ in 0..2 {
        assert_eq!(chat(&client, &gw.base).await.status(), 200);
    }
    // Same limit after the reload: the two requests still count.
    file.write(&config_text(
        &[B::sim(&s)],
        "max_attempts = 2",
        "",
        &consumer(2),
    ));
    assert_eq!(reload(&client, &gw.admin).await.0, 200);
    let r = chat(&client, &gw.base).await;
    assert_eq!(
        r.status(),
        429,
        "a reload must not hand out a fresh allowance"
    );
    let rejected = metric_value(
        &client,
        &gw.admin,
        "switchyard_consumer_rejections_total{consumer=\"team\",reason=\"requests_per_minute\"}",
    )
    .await;
    assert_eq!(rejected, 1.0);

    // A changed limit is a new limit.
    file.write(&config_text(&[B::sim(&s)], "", "", &consumer(5)));
    assert_eq!(reload(&client, &gw.admin).await.0, 200);
    assert_eq!(chat(&client, &gw.base).await.status(), 200);
    gw.stop().await;
}

#[tokio::test]
async fn a_stream_open_across_a_reload_is_counted_in_the_new_config() {
    let (url, mut streams, _server) = manual_stream_backend().await;
    let other = start_sim(sim("other")).await;
    let file = ConfigFile::new(&config_text(&[B::url("live", url.clone())], "", "", ""));
    let gw = gateway_from_file(&file, None).await;
    let client = client();

    let resp = send_chat(&client, &gw.base, true).await;
    assert_eq!(resp.status(), 200);
    let tx = streams.recv().await.unwrap();
    tx.send(Ok(bytes::Bytes::from_static(b"data: {\"n\":1}\n\n")))
        .await
        .unwrap();

    file.write(&config_text(
        &[B::url("live", url), B::sim(&other).with("priority = 2")],
        "",
        "",
        "",
    ));
    assert_eq!(reload(&client, &gw.admin).await.0, 200);
    let st = backends(&client, &gw.admin).await;
    assert_eq!(pair(&st, "live", "gpt-4o").unwrap()["in_flight"], 1, "{st}");

    tx.send(Ok(bytes::Bytes::from_static(b"data: [DONE]\n\n")))
        .await
        .unwrap();
    drop(tx);
    let body = resp.text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    until("the stream's lease ends", async || {
        let st = backends(&client, &gw.admin).await;
        pair(&st, "live", "gpt-4o").unwrap()["in_flight"] == 0
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn a_changed_file_is_picked_up_and_a_broken_one_refused() {
    let a = start_sim(sim("a")).await;
    let b = start_sim(sim("b")).await;
    let file = ConfigFile::new(&config_text(&[B::sim(&a)], "", "", ""));
    let gw = gateway_from_file(&file, Some(Duration::from_millis(20))).await;
    let client = client();
    let generation = async |client: &reqwest::Client| {
        metric_value(client, &gw.admin, "switchyard_config_generation").await
    };
    assert_eq!(generation(&client).await, 1.0);

    file.write(&config_text(&[B::sim(&b)], "", "", ""));
    until("the new file is applied", async || {
        generation(&client).await == 2.0
    })
    .await;
    let r = post_chat(&client, &gw.base).await;
    assert_eq!(header(&r, "x-switchyard-backend"), "b");

    file.write("[routing]\nstrategy = \"fastest\"\n");
    until("the broken file is refused", async || {
        metric_value(
            &client,
            &gw.admin,
            "switchyard_config_reloads_total{result=\"rejected\",trigger=\"file\"}",
        )
        .await
            == 1.0
    })
    .await;
    assert_eq!(generation(&client).await, 2.0);
    let r = post_chat(&client, &gw.base).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-backend"), "b");
    gw.stop().await;
}

#[tokio::test]
async fn restart_only_settings_are_named_and_the_rest_applies() {
    let a = start_sim(sim("a")).await;
    let file = ConfigFile::new(&config_text(&[B::sim(&a)], "", "", ""));
    let gw = gateway_from_file(&file, None).await;
    let client = client();
    let text = config_text(&[B::sim(&a)], "", "max_body_bytes = 50", "").replace(
        "listen = \"127.0.0.1:0\"\nadmin",
        "listen = \"127.0.0.1:1\"\nadmin",
    );
    file.write(&text);
    let (status, body) = reload(&client, &gw.admin).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["restart_required"],
        serde_json::json!(["server.listen"])
    );
    let config = client
        .get(format!("{}/admin/config", gw.admin))
        .send()
        .await
        .unwrap()
        .json_value()
        .await;
    assert_eq!(config["server"]["listen"], "127.0.0.1:0", "{config}");
    assert_eq!(config["generation"], 2);
    // The body limit did change.
    assert_eq!(post_chat(&client, &gw.base).await.status(), 413);
    gw.stop().await;
}

#[tokio::test]
async fn a_gateway_without_a_config_file_says_so() {
    let a = start_sim(sim("a")).await;
    let gw = gateway(&[B::sim(&a)], "", "").await;
    let client = client();
    let (status, body) = reload(&client, &gw.admin).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not started from a config file")
    );
    gw.stop().await;
}
