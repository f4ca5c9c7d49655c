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
