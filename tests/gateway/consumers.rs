//! Consumers: key rotation, and the deployments a consumer may use.

use super::*;

/// A new key beside the old one: both work until the old one's `expires`, after which it gets a
/// 401 saying it expired; the admin API lists each key by the first digits of its hash, never
/// the key.
#[tokio::test]
async fn rotated_keys_work_until_they_expire_and_the_admin_api_lists_them() {
    let s = start_sim(sim("east")).await;
    // sha256("team-b-key-from-hash-0001"), valid until well after the test.
    let hash = "3bf50e77847fad1ac7326414494664915786430d45319b71adfcd620f424ceaf";
    let tail = format!(
        "\n[[consumers]]\nname = \"team-a\"\nkeys = [\n  {{ key = \"team-a-new-key-0001\" }},\n  {{ key = \"team-a-old-key-0001\", expires = \"2020-01-31T00:00:00Z\" }},\n  {{ key_sha256 = \"{hash}\", expires = \"2999-01-01T00:00:00Z\" }},\n]\n"
    );
    let gw = gateway_env(&[B::sim(&s)], "", "", &tail, &[]).await;
    let client = client();
    let send = |key: &'static str| {
        client
            .post(gw.url(CHAT))
            .header("content-type", "application/json")
            .header("api-key", key)
            .body(chat_body(false))
            .send()
    };
    for key in ["team-a-new-key-0001", "team-b-key-from-hash-0001"] {
        assert_eq!(send(key).await.unwrap().status(), 200, "{key}");
    }
    let r = send("team-a-old-key-0001").await.unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "expired_api_key", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("expired at 2020-01-31T00:00:00Z"),
        "{message}"
    );
    assert_eq!(s.requests().len(), 2, "the expired key reached no backend");

    let listed: serde_json::Value = client
        .get(format!("{}/admin/consumers", gw.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let keys = &listed["consumers"][0]["keys"];
    assert_eq!(listed["consumers"][0]["name"], "team-a");
    assert_eq!(keys.as_array().unwrap().len(), 3);
    let prefix = |key: &str| -> String {
        switchyard::config::sha256(key.as_bytes())[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    assert_eq!(keys[0]["sha256_prefix"], prefix("team-a-new-key-0001"));
    assert_eq!(keys[0]["expires"], serde_json::Value::Null);
    assert_eq!(keys[0]["expired"], false);
    assert_eq!(keys[1]["sha256_prefix"], prefix("team-a-old-key-0001"));
    assert_eq!(keys[1]["expires"], "2020-01-31T00:00:00Z");
    assert_eq!(keys[1]["expired"], true);
    assert_eq!(keys[2]["sha256_prefix"], "3bf50e77");
    assert_eq!(keys[2]["expired"], false);
    assert!(!listed.to_string().contains("team-a-"), "{listed}");
    gw.stop().await;
}

/// A consumer with `models` gets a 403 `model_not_allowed` for any other deployment, named in
/// the path or in a v1 body's `model`, before any backend is asked; one without may use any.
#[tokio::test]
async fn a_consumer_may_use_only_its_models() {
    let s = start_sim(sim("east")).await;
    let tail = "\n[[consumers]]\nname = \"team-a\"\nkey = \"team-a-key-0123456789\"\nmodels = [\"gpt-4o\", \"text-embedding-3-large\"]\n\n[[consumers]]\nname = \"team-b\"\nkey = \"team-b-key-0123456789\"\n";
    let gw = gateway_env(&[B::sim(&s)], "", "", tail, &[]).await;
    let client = client();
    let send = |key: &'static str, path: String, body: String| {
        client
            .post(gw.url(&path))
            .header("content-type", "application/json")
            .header("api-key", key)
            .body(body)
            .send()
    };
    let classic =
        |d: &str| format!("/openai/deployments/{d}/chat/completions?api-version=2024-10-21");
    let v1 = |m: &str| {
        (
            "/openai/v1/chat/completions".to_string(),
            format!(r#"{{"model":"{m}","messages":[{{"role":"user","content":"hi"}}]}}"#),
        )
    };
    let r = send("team-a-key-0123456789", classic("gpt-4o"), chat_body(false))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (path, body) = v1("gpt-4o");
    assert_eq!(
        send("team-a-key-0123456789", path, body)
            .await
            .unwrap()
            .status(),
        200
    );
    let before = s.requests().len();
    for (path, body) in [
        (classic("gpt-4o-mini"), chat_body(false)),
        v1("gpt-4o-mini"),
    ] {
        let r = send("team-a-key-0123456789", path.clone(), body)
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path}");
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_allowed", "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("'gpt-4o-mini'") && message.contains("gpt-4o, text-embedding-3-large"),
            "{message}"
        );
    }
    assert_eq!(
        s.requests().len(),
        before,
        "a refused model reached no backend"
    );
    let r = send(
        "team-b-key-0123456789",
        classic("gpt-4o-mini"),
        chat_body(false),
    )
    .await
    .unwrap();
    assert_eq!(
        r.status(),
        200,
        "a consumer without models may use any deployment"
    );
    gw.stop().await;
}

/// `GET /v1/models`, `/openai/v1/models` and `/openai/models` list the gateway's deployments,
/// not a backend's base models, only those the caller may use; `…/models/{name}` gives one.
#[tokio::test]
async fn the_model_list_is_the_gateways_own_and_each_consumer_sees_its_models() {
    let s = start_sim(sim("east")).await;
    let tail = "\n[[deployments]]\nname = \"gpt-4o\"\nbackends = { east = \"gpt-4o\" }\n\n[[deployments]]\nname = \"gpt-4o-mini\"\nbackends = { east = \"gpt-4o-mini\" }\n\n[[consumers]]\nname = \"team-a\"\nkey = \"team-a-key-0123456789\"\nmodels = [\"gpt-4o\"]\n\n[[consumers]]\nname = \"team-b\"\nkey = \"team-b-key-0123456789\"\n";
    let gw = gateway_env(&[B::sim(&s)], "", "", tail, &[]).await;
    let client = client();
    let get = |key: &'static str, path: &'static str| {
        client
            .get(gw.url(path))
            .header("authorization", format!("Bearer {key}"))
            .send()
    };
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    for path in [
        "/v1/models",
        "/openai/v1/models",
        "/openai/models?api-version=2024-10-21",
    ] {
        let r = get("team-b-key-0123456789", path).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(ids(&v), ["gpt-4o", "gpt-4o-mini"], "{path}");
        assert_eq!(v["data"][0]["object"], "model");
        assert!(v["data"][0]["created"].as_u64().unwrap() > 1_700_000_000);
        assert!(v["note"].as_str().unwrap().contains("forwarded"), "{v}");
        let r = get("team-a-key-0123456789", path).await.unwrap();
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(ids(&v), ["gpt-4o"], "team-a sees only its model: {path}");
    }
    let r = get("team-a-key-0123456789", "/v1/models/gpt-4o")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["id"], "gpt-4o");
    for (key, path) in [
        ("team-a-key-0123456789", "/v1/models/gpt-4o-mini"),
        ("team-b-key-0123456789", "/openai/v1/models/dall-e-3"),
    ] {
        let r = get(key, path).await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "model_not_found", "{v}");
    }
    assert_eq!(
        get("wrong-key-0123456789", "/v1/models")
            .await
            .unwrap()
            .status(),
        401
    );
    assert!(s.requests().is_empty(), "no backend was asked");
    gw.stop().await;

    // Only listed names served: no note.
    let tail = "\n[[deployments]]\nname = \"gpt-4o\"\nbackends = { east = \"gpt-4o\" }\n";
    let gw = gateway_env(
        &[B::sim(&s)],
        "unknown_deployments = \"reject\"\n",
        "",
        tail,
        &[],
    )
    .await;
    let v: serde_json::Value = client
        .get(gw.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ids(&v), ["gpt-4o"]);
    assert!(v.get("note").is_none(), "{v}");
    gw.stop().await;
}
