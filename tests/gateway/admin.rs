//! The admin listener: readiness, the admin API, drains, and the metrics the dashboard reads.

use super::*;

/// `/readyz` means "can serve": ready while every deployment has a backend that can take it,
/// what is degraded listed; not ready once one has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_means_every_deployment_can_be_served() {
    let (_sims, backends) = start_sims(&["east", "west"]).await;
    let tail = "\n[[deployments]]\nname = \"gpt-4o\"\nbackends = { east = \"gpt-4o\", west = \"gpt-4o\" }\n\n[[deployments]]\nname = \"embed\"\nbackends = { east = \"embed\" }\n";
    let gw = gateway_with(&backends, "unknown_deployments = \"reject\"", "", tail).await;
    let client = client();
    let ready = async || {
        let r = client
            .get(format!("{}/readyz", gw.admin))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let admin = async |path: &str| {
        let r = client
            .post(format!("{}{path}", gw.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    };
    assert_eq!(ready().await, (200, "ready\n".to_string()));
    // West drained: both deployments still have east.
    admin("/admin/backends/west/drain").await;
    assert_eq!(
        ready().await,
        (200, "ready\nbackend west: drained\n".to_string())
    );
    // East drained instead: `embed` has no backend left.
    admin("/admin/backends/west/enable").await;
    admin("/admin/backends/east/drain").await;
    let (status, body) = ready().await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("no backend can serve: embed\n"), "{body}");
    admin("/admin/backends/east/enable").await;
    assert_eq!(ready().await.0, 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let s = start_sim(sim("east")).await;
    let gw = gateway(&[B::sim(&s)], "", "").await;
    let client = client();
    post_chat(&client, &gw.base).await;
    let get = |p: &str| client.get(format!("{}{p}", gw.admin)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    let m = get("/metrics").await.unwrap().text().await.unwrap();
    assert!(
        m.contains("switchyard_requests_total{deployment=\"gpt-4o\",backend=\"east\",status_class=\"2xx\",consumer=\"-\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("switchyard_attempts_total{backend=\"east\",outcome=\"200\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("switchyard_request_duration_seconds_bucket"),
        "{m}"
    );
    assert!(m.contains("switchyard_in_flight_requests 0"), "{m}");
    assert!(!m.contains("key-east"));
    assert_eq!(get("/nope").await.unwrap().status(), 404);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_shows_backend_state_drains_and_redacts() {
    let (sims, backends) = start_sims(&["a", "b"]).await;
    sims[0]
        .set_faults(Faults {
            error_rate: 1.0,
            error_status: 429,
            retry_after_ms: Some(30_000),
            ..Faults::default()
        })
        .await;
    let gw = gateway(&backends, "", "admin_key = \"admin-key-0123456789\"").await;
    let client = client();
    assert_eq!(post_chat(&client, &gw.base).await.status(), 200);

    let admin = |method: reqwest::Method, path: &str| {
        client
            .request(method, format!("{}{path}", gw.admin))
            .header("authorization", "Bearer admin-key-0123456789")
    };
    let unauth = client
        .get(format!("{}/admin/backends", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(unauth.status(), 401);
    let open = client
        .get(format!("{}/metrics", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), 200, "metrics stay open for scrapers");

    let v: serde_json::Value = admin(reqwest::Method::GET, "/admin/backends")
        .send()
        .await
        .unwrap()
        .json_value()
        .await;
    let a = &v["backends"][0];
    assert_eq!(a["name"], "a");
    assert_eq!(a["deployments"][0]["deployment"], "gpt-4o");
    assert_eq!(a["deployments"][0]["state"], "cooling_down");
    let left = a["deployments"][0]["available_in_ms"].as_u64().unwrap();
    assert!(left > 25_000 && left <= 30_000, "{left}");
    assert!(
        a["last_error"]["error"].as_str().unwrap().contains("429"),
        "{a}"
    );
    assert_eq!(v["backends"][1]["deployments"][0]["state"], "healthy");

    // Drain b: with a cooling down too, nothing is left, so clients get a clear answer.
    let r = admin(reqwest::Method::POST, "/admin/backends/b/drain")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let served = sims[1].stats().requests;
    assert_eq!(post_chat(&client, &gw.base).await.status(), 429);
    assert_eq!(
        sims[1].stats().requests,
        served,
        "a drained backend takes no new requests"
    );
    admin(reqwest::Method::POST, "/admin/backends/b/enable")
        .send()
        .await
        .unwrap();
    assert_eq!(post_chat(&client, &gw.base).await.status(), 200);
    let r = admin(reqwest::Method::POST, "/admin/backends/zzz/drain")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let m = metrics_text(&client, &gw.admin).await;
    assert!(
        m.contains(
            "switchyard_backend_state{deployment=\"gpt-4o\",backend=\"a\",state=\"cooling_down\"} 1"
        ),
        "{m}"
    );
    assert!(m.contains(
        "switchyard_backend_state{deployment=\"gpt-4o\",backend=\"b\",state=\"healthy\"} 1"
    ));
    assert!(
        m.contains("switchyard_gateway_overhead_seconds_count 2"),
        "{m}"
    );
    assert!(
        m.contains("switchyard_time_to_first_byte_seconds_count{backend=\"b\"} 2"),
        "{m}"
    );
    assert!(m.ends_with("# EOF\n"));
    let cfg = admin(reqwest::Method::GET, "/admin/config")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        cfg.contains("\"name\":\"a\"") && cfg.contains("api_key"),
        "{cfg}"
    );
    assert!(
        !cfg.contains("key-a") && !cfg.contains("admin-key-0123"),
        "no secret: {cfg}"
    );
    gw.stop().await;
}

/// Every metric the shipped Grafana dashboard queries exists in the gateway's `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_metrics_that_exist() {
    let dash: serde_json::Value = serde_json::from_str(include_str!(
        "../../deploy/grafana/switchyard-dashboard.json"
    ))
    .unwrap();
    let mut names = std::collections::BTreeSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("switchyard_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                names.insert(name);
            }
        }
    }
    assert!(names.len() > 10, "{names:?}");
    // A gateway with a keyless backend, a limited consumer and Redis-free limits: every family.
    let s = start_sim(sim("east")).await;
    let tail = "\n[[consumers]]\nname = \"team-a\"\nkey = \"team-a-key-0123456789\"\ntokens_per_minute = 100000\n";
    let gw = gateway_with(&[B::sim(&s)], "", "", tail).await;
    let client = client();
    let r = client
        .post(gw.url(CHAT))
        .header("api-key", "team-a-key-0123456789")
        .body(chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    let m = metrics_text(&client, &gw.admin).await;
    // Families appear in /metrics once they have samples; the rest must at least be registered
    // (by name in telemetry/mod.rs) or rendered by the admin listener (admin/metrics.rs).
    let telemetry = include_str!("../../src/telemetry/mod.rs");
    let admin = include_str!("../../src/admin/metrics.rs");
    for name in &names {
        let family = name.trim_end_matches("_total").trim_end_matches("_bucket");
        let exported = m
            .lines()
            .any(|l| l.starts_with(name.as_str()) || l.starts_with(&format!("# TYPE {family} ")));
        let stem = family.trim_start_matches("switchyard_");
        let registered = telemetry.contains(&format!("\"{stem}\"")) || admin.contains(family);
        assert!(
            exported || registered,
            "the dashboard queries {name}, which is neither exported nor registered"
        );
    }
    gw.stop().await;
}
