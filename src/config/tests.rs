use super::*;

const SAMPLE: &str = include_str!("../../switchyard.example.toml");

fn env(name: &str) -> Option<String> {
    match name {
        "EASTUS_KEY" => Some("east-secret-1".into()),
        "WESTUS_KEY" => Some("west-secret-2".into()),
        _ => None,
    }
}

fn err(text: &str) -> ConfigError {
    Config::parse(text, &env).unwrap_err()
}

#[test]
fn the_issue_shape_parses() {
    let c = Config::parse(SAMPLE, &env).unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.server.admin_listen.unwrap().port(), 9090);
    assert_eq!(c.routing.max_attempts, 3);
    assert_eq!(c.backends.len(), 2);
    assert_eq!(
        c.backends[1].url.to_string(),
        "https://my-westus.openai.azure.com"
    );
    match &c.backends[0].auth {
        BackendAuth::ApiKey(k) => assert_eq!(k.expose(), "east-secret-1"),
        other => panic!("unexpected auth {other:?}"),
    }
    assert!(c.routing.retries_status(StatusCode::TOO_MANY_REQUESTS));
    assert!(!c.routing.retries_status(StatusCode::BAD_REQUEST));
}

#[test]
fn summary_and_debug_hide_secrets() {
    let c = Config::parse(SAMPLE, &env).unwrap();
    let text = format!("{}{:?}", c.summary(), c);
    assert!(!text.contains("east-secret-1"), "{text}");
    assert!(!text.contains("west-secret-2"), "{text}");
    assert!(text.contains("eastus"));
}

#[test]
fn missing_variable_names_the_field() {
    let e = Config::parse(SAMPLE, &|_| None).unwrap_err();
    assert_eq!(e.path, "backends[0].auth.key");
    assert!(e.message.contains("EASTUS_KEY"), "{e}");
}

#[test]
fn unknown_key_names_the_field() {
    let e = err("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n");
    assert_eq!(e.path, "server.lisen");
    assert!(e.message.contains("lisen"), "{e}");
    let e = err(&SAMPLE.replace("name = \"westus\"", "name = \"westus\"\nwieght = 2"));
    assert_eq!(e.path, "backends[1].wieght");
    assert!(e.message.contains("wieght"), "{e}");
    let e = err(&SAMPLE.replace("key = \"${EASTUS_KEY}\"", "key = \"x\", extra = 1"));
    assert!(e.path.starts_with("backends[0].auth"), "{e}");
}

#[test]
fn duplicate_backend_is_an_error() {
    let e = err(&SAMPLE.replace("westus\"\nurl", "eastus\"\nurl"));
    assert_eq!(e.path, "backends[1].name");
    assert!(e.message.contains("duplicate"));
}

#[test]
fn bad_urls_are_errors() {
    for bad in [
        "my-eastus.openai.azure.com",
        "ftp://x.example",
        "https://",
        "https://h/?a=1",
        "https://u:p@h",
    ] {
        let e = err(&SAMPLE.replace("https://my-eastus.openai.azure.com", bad));
        assert_eq!(e.path, "backends[0].url", "{bad}: {e}");
    }
}

#[test]
fn other_field_errors() {
    let e = err(&SAMPLE.replace("strategy = \"round_robin\"", "strategy = \"random\""));
    assert_eq!(e.path, "routing.strategy");
    let e = err(&SAMPLE.replace("max_attempts = 3", "max_attempts = 0"));
    assert_eq!(e.path, "routing.max_attempts");
    let e = err(&SAMPLE.replace("max_attempts = 3", "retry_on_status = [429, 200]"));
    assert_eq!(e.path, "routing.retry_on_status[1]");
    let e = err(&SAMPLE.replace("\"127.0.0.1:8080\"", "\"localhost\""));
    assert_eq!(e.path, "server.listen");
    let e = err(&SAMPLE.replace("max_attempts = 3", "connect_timeout = \"5\""));
    assert_eq!(e.path, "routing.connect_timeout");
    let e = err(&SAMPLE.replace(
        "type = \"api_key\", key = \"${WESTUS_KEY}\"",
        "type = \"magic\"",
    ));
    assert_eq!(e.path, "backends[1].auth.type");
    let e = err("[[backends]]\nname = \"a\"\n");
    assert!(e.path.starts_with("backends[0]"), "{e}");
    let e = err("[server]\n");
    assert_eq!(e.path, "backends");
    let e = err("not toml");
    assert!(e.message.contains("invalid TOML"));
    let e = err(&SAMPLE.replace(
        "\"127.0.0.1:8080\"",
        "\"127.0.0.1:8080\"\nadmin_hosts = [\"ok.internal\", \"evil.example:80\"]",
    ));
    assert_eq!(e.path, "server.admin_hosts[1]");
    let e = err(&SAMPLE.replace(
        "\"127.0.0.1:8080\"",
        "\"127.0.0.1:8080\"\nbody_read_timeout = \"0s\"",
    ));
    assert_eq!(e.path, "server.body_read_timeout");
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert!(parse_duration("10").is_err());
    assert!(parse_duration("s").is_err());
}

#[test]
fn backend_url_keeps_a_path_prefix_without_trailing_slash() {
    let c = Config::parse(
        &SAMPLE.replace(
            "https://my-westus.openai.azure.com",
            "https://apim.example.net/aoai/",
        ),
        &env,
    )
    .unwrap();
    assert_eq!(c.backends[1].url.base_path, "/aoai");
    assert_eq!(
        c.backends[1].url.to_string(),
        "https://apim.example.net/aoai"
    );
}

fn with_auth(auth: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let text = SAMPLE.replace(
        r#"auth = { type = "api_key", key = "${WESTUS_KEY}" }"#,
        &format!("auth = {auth}"),
    );
    let lookup = |name: &str| {
        env.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
            .or_else(|| self::env(name))
    };
    Config::parse(&text, &lookup)
}

fn flow(c: &Config) -> &EntraFlow {
    match &c.backends[1].auth {
        BackendAuth::Entra(e) => &e.flow,
        other => panic!("not entra: {other:?}"),
    }
}

#[test]
fn managed_identity_picks_its_source_from_the_platform() {
    let c = with_auth(r#"{ type = "managed_identity" }"#, &[]).unwrap();
    match flow(&c) {
        EntraFlow::ManagedIdentity {
            id: None,
            source: MiSource::Imds { endpoint },
        } => {
            assert!(endpoint.starts_with("http://169.254.169.254/"));
        }
        other => panic!("{other:?}"),
    }
    let env = [
        ("IDENTITY_ENDPOINT", "http://localhost:42356/msi/token"),
        ("IDENTITY_HEADER", "hdr-secret"),
    ];
    let c = with_auth(
        r#"{ type = "managed_identity", resource_id = "/subscriptions/x/id" }"#,
        &env,
    )
    .unwrap();
    match flow(&c) {
        EntraFlow::ManagedIdentity {
            id: Some(ManagedIdentityId::ResourceId(_)),
            source: MiSource::AppService { .. },
        } => {}
        other => panic!("{other:?}"),
    }
    let shown = format!("{}{c:?}", c.summary());
    assert!(!shown.contains("hdr-secret"), "{shown}");
    assert!(shown.contains("managed_identity"));
    match &c.backends[1].auth {
        BackendAuth::Entra(e) => assert_eq!(e.scope, DEFAULT_SCOPE),
        _ => unreachable!(),
    }
    let e = with_auth(
        r#"{ type = "managed_identity", client_id = "a", object_id = "b" }"#,
        &[],
    )
    .unwrap_err();
    assert_eq!(e.path, "backends[1].auth");
    let e = with_auth(
        r#"{ type = "managed_identity", scope = "cognitiveservices" }"#,
        &[],
    )
    .unwrap_err();
    assert_eq!(e.path, "backends[1].auth.scope");
    let e = with_auth(
        r#"{ type = "managed_identity", endpoint = "not a url" }"#,
        &[],
    )
    .unwrap_err();
    assert_eq!(e.path, "backends[1].auth.endpoint");
}

#[test]
fn workload_identity_reads_the_aks_environment_and_names_what_is_missing() {
    let env = [
        ("AZURE_CLIENT_ID", "cid"),
        ("AZURE_TENANT_ID", "tid"),
        (
            "AZURE_FEDERATED_TOKEN_FILE",
            "/var/run/secrets/azure/tokens/azure-identity-token",
        ),
    ];
    let c = with_auth(r#"{ type = "workload_identity" }"#, &env).unwrap();
    match flow(&c) {
        EntraFlow::WorkloadIdentity {
            client_id,
            tenant_id,
            authority_host,
            ..
        } => {
            assert_eq!((client_id.as_str(), tenant_id.as_str()), ("cid", "tid"));
            assert_eq!(authority_host, "https://login.microsoftonline.com/");
        }
        other => panic!("{other:?}"),
    }
    let e = with_auth(r#"{ type = "workload_identity" }"#, &env[..2]).unwrap_err();
    assert_eq!(e.path, "backends[1].auth.token_file");
    assert!(e.message.contains("AZURE_FEDERATED_TOKEN_FILE"), "{e}");
}

#[test]
fn client_secret_is_a_secret() {
    let c = with_auth(
        r#"{ type = "client_secret", tenant_id = "t", client_id = "c", client_secret = "${EASTUS_KEY}" }"#,
        &[],
    )
    .unwrap();
    assert!(!format!("{c:?}{}", c.summary()).contains("east-secret-1"));
    let e = with_auth(
        r#"{ type = "client_secret", tenant_id = "t", client_id = "" , client_secret = "s" }"#,
        &[],
    )
    .unwrap_err();
    assert_eq!(e.path, "backends[1].auth.client_id");
    let e = with_auth(r#"{ type = "client_secret", tenant_id = "t" }"#, &[]).unwrap_err();
    assert!(e.path.starts_with("backends[1].auth"), "{e}");
}

#[test]
fn consumers_keep_only_key_hashes_and_name_their_errors() {
    let base =
        "[[backends]]\nname = \"a\"\nurl = \"http://127.0.0.1:1\"\nauth = { type = \"none\" }\n";
    let c = Config::parse(
        &format!("{base}[[consumers]]\nname = \"team-a\"\nkey = \"${{EASTUS_KEY}}-padding\"\n"),
        &env,
    )
    .unwrap();
    assert_eq!(
        c.consumers[0].keys,
        vec![crate::config::ConsumerKey {
            sha256: crate::config::sha256(b"east-secret-1-padding"),
            expires: None
        }]
    );
    assert!(!format!("{c:?}{}", c.summary()).contains("east-secret"));
    for (consumer, path) in [
        ("name = \"x\"\n", "consumers[0].key"),
        ("name = \"x\"\nkey = \"short\"\n", "consumers[0].key"),
        (
            "name = \"x\"\nkey_sha256 = \"abc\"\n",
            "consumers[0].key_sha256",
        ),
        (
            "name = \"x y\"\nkey = \"0123456789abcdef\"\n",
            "consumers[0].name",
        ),
        (
            "name = \"x\"\nkey = \"0123456789abcdef\"\nkey_sha256 = \"00\"\n",
            "consumers[0].key",
        ),
        (
            "name = \"x\"\nkey = \"0123456789abcdef\"\nmodels = [\"gpt-4o\", \"a b\"]\n",
            "consumers[0].models[1]",
        ),
        (
            "name = \"x\"\nkeys = [{ key = \"short\" }]\n",
            "consumers[0].keys[0].key",
        ),
        (
            "name = \"x\"\nkeys = [{ key = \"0123456789abcdef\" }, { key_sha256 = \"00\" }]\n",
            "consumers[0].keys[1].key_sha256",
        ),
        (
            "name = \"x\"\nkeys = [{ key = \"0123456789abcdef\", expires = \"next week\" }]\n",
            "consumers[0].keys[0].expires",
        ),
        (
            "name = \"x\"\nkeys = [{ expires = \"2027-01-31T00:00:00Z\" }]\n",
            "consumers[0].keys[0].key",
        ),
        (
            "name = \"x\"\nkey = \"0123456789abcdef\"\nkeys = [{ key = \"0123456789abcdef\" }]\n",
            "consumers[0].keys",
        ),
    ] {
        let e = Config::parse(&format!("{base}[[consumers]]\n{consumer}"), &env).unwrap_err();
        assert_eq!(e.path, path, "{consumer}: {e}");
    }
    let twice = format!(
        "{base}[[consumers]]\nname = \"x\"\nkey = \"0123456789abcdef\"\n[[consumers]]\nname = \"y\"\nkey = \"0123456789abcdef\"\n"
    );
    assert_eq!(
        Config::parse(&twice, &env).unwrap_err().path,
        "consumers[1].key"
    );
    let hash = "ab".repeat(32);
    let rotated = Config::parse(
        &format!(
            "{base}[[consumers]]\nname = \"x\"\nkeys = [{{ key = \"0123456789abcdef\", expires = \"2027-01-31T00:00:00Z\" }}, {{ key_sha256 = \"{hash}\" }}]\n"
        ),
        &env,
    )
    .unwrap();
    let keys = &rotated.consumers[0].keys;
    assert_eq!(keys.len(), 2);
    assert_eq!(
        keys[0].expires,
        Some(humantime::parse_rfc3339("2027-01-31T00:00:00Z").unwrap())
    );
    assert_eq!((keys[1].sha256, keys[1].expires), ([0xab; 32], None));
    assert_eq!(keys[1].prefix(), "abababab");
}

#[test]
fn consumer_limits_name_their_fields() {
    let base = "[[backends]]\nname = \"a\"\nurl = \"http://127.0.0.1:1\"\nauth = { type = \"none\" }\n[[consumers]]\nname = \"x\"\nkey = \"0123456789abcdef\"\n";
    let c = Config::parse(
        &format!("{base}tokens_per_minute = 1000\ntoken_quota = {{ period = \"month\", tokens = 5 }}\ndeployments = {{ gpt-4o = {{ requests_per_minute = 3 }} }}\n"),
        &env,
    )
    .unwrap();
    assert_eq!(c.consumers[0].limits.tokens_per_minute, Some(1000));
    assert_eq!(c.consumers[0].deployment_limits[0].0, "gpt-4o");
    assert_eq!(
        c.consumers[0].deployment_limits[0].1.requests_per_minute,
        Some(3)
    );
    for (extra, path) in [
        (
            "requests_per_minute = 0\n",
            "consumers[0].requests_per_minute",
        ),
        (
            "token_quota = { period = \"week\", tokens = 5 }\n",
            "consumers[0].token_quota.period",
        ),
        (
            "deployments = { gpt-4o = { tokens_per_minute = 0 } }\n",
            "consumers[0].deployments.gpt-4o.tokens_per_minute",
        ),
        (
            "deployments = { \"a/b\" = { tokens_per_minute = 1 } }\n",
            "consumers[0].deployments.a/b",
        ),
    ] {
        let e = Config::parse(&format!("{base}{extra}"), &env).unwrap_err();
        assert_eq!(e.path, path, "{extra}: {e}");
    }
    let e = Config::parse(&format!("{base}[limits]\nstore = \"redis\"\n"), &env).unwrap_err();
    assert_eq!(e.path, "limits.redis_url");
    let e = Config::parse(
        &format!("{base}[limits]\nstore = \"redis\"\nredis_url = \"http://x\"\n"),
        &env,
    )
    .unwrap_err();
    assert_eq!(e.path, "limits.redis_url");
    let c = Config::parse(
        &format!(
            "{base}[limits]\nstore = \"redis\"\nredis_url = \"redis://:pw-secret@127.0.0.1:6379\"\n"
        ),
        &env,
    )
    .unwrap();
    assert!(!format!("{c:?}").contains("pw-secret"));
    let e = Config::parse(&format!("{base}[limits]\nstore = \"disk\"\n"), &env).unwrap_err();
    assert_eq!(e.path, "limits.store");
}

#[test]
fn the_redis_of_azure_validates_field_by_field() {
    let base = SAMPLE;
    let limits = |extra: &str| format!("{base}[limits]\nstore = \"redis\"\n{extra}");
    // Azure Managed Redis: TLS, clustered, Entra ID sign-in.
    let c = Config::parse(
        &limits(
            "redis_url = \"rediss://cache.westeurope.redis.azure.net:10000\"\nredis_cluster = true\n\
             redis_auth = { type = \"managed_identity\", client_id = \"11111111-2222-3333-4444-555555555555\" }\n\
             redis_user = \"9b2a0c2e-0000-4000-8000-000000000001\"\n",
        ),
        &env,
    )
    .unwrap();
    let LimitStore::Redis(r) = &c.limits.store else {
        panic!("a Redis store")
    };
    assert!(r.cluster);
    assert_eq!(
        r.auth.as_ref().unwrap().scope,
        "https://redis.azure.com/.default"
    );
    assert_eq!(
        r.user.as_deref(),
        Some("9b2a0c2e-0000-4000-8000-000000000001")
    );
    // An ACL user and a database number.
    assert!(
        Config::parse(
            &limits("redis_url = \"rediss://gateway:pw-secret@cache:6380/2\"\n"),
            &env
        )
        .is_ok()
    );
    for (extra, path, says) in [
        (
            "redis_url = \"rediss://cache:6380/#insecure\"\n",
            "limits.redis_url",
            "always verified",
        ),
        (
            "redis_url = \"redis://cache:6379/3\"\nredis_cluster = true\n",
            "limits.redis_url",
            "only database 0",
        ),
        (
            "redis_url = \"rediss://:pw@cache:6380\"\nredis_auth = { type = \"azure_cli\" }\n",
            "limits.redis_url",
            "keep one",
        ),
        (
            "redis_url = \"rediss://me@cache:6380\"\nredis_auth = { type = \"azure_cli\" }\n",
            "limits.redis_url",
            "limits.redis_user",
        ),
        (
            "redis_url = \"rediss://cache:6380\"\nredis_user = \"someone\"\n",
            "limits.redis_user",
            "redis_auth",
        ),
        (
            "redis_url = \"rediss://cache:6380\"\nredis_auth = { type = \"azure_cli\" }\nredis_user = \" \"\n",
            "limits.redis_user",
            "user name",
        ),
        (
            "redis_url = \"rediss://cache:6380\"\nredis_auth = { type = \"workload_identity\" }\n",
            "limits.redis_auth.client_id",
            "AZURE_CLIENT_ID",
        ),
        (
            "redis_url = \"rediss://cache:6380\"\nredis_auth = { type = \"api_key\", key = \"x\" }\n",
            "limits.redis_auth",
            "not an Entra ID credential",
        ),
        (
            "redis_url = \"rediss://cache:6380\"\nredis_cluster = \"yes\"\n",
            "limits.redis_cluster",
            "",
        ),
    ] {
        let e = Config::parse(&limits(extra), &env).unwrap_err();
        assert_eq!(e.path, path, "{extra}: {e}");
        assert!(e.to_string().contains(says), "{extra}: {e}");
        assert!(!e.to_string().contains("pw"), "{extra}: {e}");
    }
    let e = Config::parse(&format!("{base}[limits]\nredis_cluster = true\n"), &env).unwrap_err();
    assert_eq!(e.path, "limits.redis_cluster");
}

#[test]
fn an_admin_listener_off_loopback_needs_a_key() {
    let e = err(&SAMPLE.replace(
        "admin_listen = \"127.0.0.1:9090\"",
        "admin_listen = \"0.0.0.0:9090\"",
    ));
    assert_eq!(e.path, "server.admin_key");
    let c = Config::parse(
        &SAMPLE.replace(
            "admin_listen = \"127.0.0.1:9090\"",
            "admin_listen = \"0.0.0.0:9090\"\nadmin_key = \"${EASTUS_KEY}-long-enough\"",
        ),
        &env,
    )
    .unwrap();
    assert!(c.server.admin_key.is_some());
    let json = c.redacted_json().to_string();
    assert!(
        !json.contains("east-secret") && !json.contains("west-secret"),
        "{json}"
    );
}

#[test]
fn errors_point_at_the_place() {
    // A TOML syntax error says where.
    let e = err("[server]\nlisten = \"127.0.0.1:8080\"\nadmin_key = \"unterminated\n");
    assert!(e.message.contains("at line 3, column"), "{e}");
    let e = err("[server]\nlisten = 8080 8080\n");
    assert!(e.message.contains("at line 2"), "{e}");

    // A misspelt key is named before a variable it mentions is looked up.
    let e = err(&SAMPLE.replace("key = \"${WESTUS_KEY}\"", "keys = \"${NOT_SET_ANYWHERE}\""));
    assert!(e.message.starts_with("unknown field `keys`"), "{e}");
    assert!(e.path.starts_with("backends[1].auth"), "{e}");
    // A variable standing for a valid value is still looked up first.
    let strategy = |v: &str| {
        Config::parse(
            &SAMPLE.replace("strategy = \"round_robin\"", "strategy = \"${STRATEGY}\""),
            &|n| (n == "STRATEGY").then(|| v.to_string()).or_else(|| env(n)),
        )
    };
    assert!(strategy("least_inflight").is_ok());
    assert_eq!(strategy("nope").unwrap_err().path, "routing.strategy");

    // A backend URL ending in /openai would send every request to /openai/openai/...
    let e = err(&SAMPLE.replace(
        "https://my-westus.openai.azure.com",
        "https://my-westus.openai.azure.com/openai/",
    ));
    assert_eq!(e.path, "backends[1].url");
    assert!(e.message.contains("/openai/openai"), "{e}");

    // The admin listener on the client listener's port.
    for admin in ["127.0.0.1:8080", "0.0.0.0:8080"] {
        let e = err(&SAMPLE.replace("\"127.0.0.1:9090\"", &format!("\"{admin}\"")));
        assert_eq!(e.path, "server.admin_listen", "{admin}: {e}");
    }
    assert!(
        Config::parse(
            &SAMPLE.replace("\"127.0.0.1:9090\"", "\"127.0.0.2:8080\""),
            &env
        )
        .is_ok()
    );
}

#[test]
fn a_deployment_backend_may_be_a_table_with_its_own_priority_and_weight() {
    let base = "[[backends]]\nname = \"ptu\"\nurl = \"http://127.0.0.1:1\"\nauth = { type = \"none\" }\npriority = 2\nweight = 5\n[[backends]]\nname = \"paygo\"\nurl = \"http://127.0.0.1:2\"\nauth = { type = \"none\" }\n";
    let c = Config::parse(
        &format!("{base}[[deployments]]\nname = \"gpt-4o\"\nbackends = {{ ptu = {{ deployment = \"gpt-4o-ptu\", priority = 1 }}, paygo = \"gpt-4o\" }}\n"),
        &env,
    )
    .unwrap();
    let d = &c.deployments[0];
    assert_eq!(
        d.backends,
        vec![(0, "gpt-4o-ptu".to_string()), (1, "gpt-4o".to_string())]
    );
    // The priority given, the backend's own weight.
    assert_eq!(d.ranks, vec![(0, 1, 5)]);
    for (entry, path) in [
        (
            "ptu = { deployment = \"gpt-4o\", priority = 0 }",
            "deployments[0].backends.ptu.priority",
        ),
        (
            "ptu = { deployment = \"gpt-4o\", weight = 1001 }",
            "deployments[0].backends.ptu.weight",
        ),
        (
            "ptu = { deployment = \"a b\" }",
            "deployments[0].backends.ptu",
        ),
    ] {
        let e = Config::parse(
            &format!("{base}[[deployments]]\nname = \"gpt-4o\"\nbackends = {{ {entry} }}\n"),
            &env,
        )
        .unwrap_err();
        assert_eq!(e.path, path, "{entry}: {e}");
    }
}

#[test]
fn otlp_metrics_take_a_collector_and_an_interval() {
    let with = |section: &str| format!("{SAMPLE}\n[metrics]\n{section}\n");
    let c = Config::parse(
        &with("otlp_endpoint = \"http://collector:4318/\"\nheaders = { \"x-key\" = \"s3cret\" }"),
        &env,
    )
    .unwrap();
    let m = c.metrics.unwrap();
    assert_eq!(m.endpoint.to_string(), "http://collector:4318/v1/metrics");
    assert_eq!(m.export_interval, Duration::from_secs(60));
    assert_eq!(m.service_name, "switchyard");
    assert!(!format!("{:?}", m.headers).contains("s3cret"));
    assert_eq!(
        err(&with("otlp_endpoint = \"collector\"")).path,
        "metrics.otlp_endpoint"
    );
    let e = err(&with(
        "otlp_endpoint = \"http://c:4318\"\nexport_interval = \"10ms\"",
    ));
    assert_eq!(e.path, "metrics.export_interval");
    let e = err(&with(
        "otlp_endpoint = \"http://c:4318\"\nheaders = { \"bad name\" = \"v\" }",
    ));
    assert_eq!(e.path, "metrics.headers.bad name");
}
