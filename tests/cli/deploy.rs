//! What ships for deploys (configs, the Dockerfile, the Bicep), the demo, and the start-up warning.

use super::*;

/// The configs shipped for deployment stay valid as the config format moves on.
#[test]
fn shipped_deployment_configs_are_valid() {
    let env = |name: &str| match name {
        "SWITCHYARD_ADMIN_KEY" => Some("0123456789abcdef-admin".to_string()),
        "EASTUS_KEY" | "WESTUS_KEY" => Some("key".to_string()),
        _ => None,
    };
    for path in [
        "deploy/container/switchyard.toml",
        "switchyard.example.toml",
    ] {
        let text = std::fs::read_to_string(path).unwrap();
        if let Err(e) = switchyard::config::Config::parse(&text, &env) {
            panic!("{path}: {e}");
        }
    }
}

/// The image's health check and default command point at what the shipped container config
/// sets up: the admin listener's port and the mounted config's path.
#[test]
fn the_dockerfile_matches_the_container_config() {
    let dockerfile = std::fs::read_to_string("Dockerfile").unwrap();
    let lookup = |_: &str| Some("0123456789abcdef-admin".to_string());
    let text = std::fs::read_to_string("deploy/container/switchyard.toml").unwrap();
    let cfg = switchyard::config::Config::parse(&text, &lookup).unwrap();
    let admin_port = cfg.server.admin_listen.unwrap().port();
    assert!(
        dockerfile.contains(&format!("http://127.0.0.1:{admin_port}/healthz")),
        "HEALTHCHECK must probe the admin port {admin_port}"
    );
    assert!(dockerfile.contains(&format!("EXPOSE {} {admin_port}", cfg.server.listen.port())));
    assert!(dockerfile.contains(r#"CMD ["serve", "--config", "/etc/switchyard/switchyard.toml"]"#));
    assert!(
        cfg.server.listen.ip().is_unspecified(),
        "a container listens on all interfaces"
    );
}

/// What can be checked of the Bicep without a Bicep compiler: every parameter the parameters
/// file sets is declared, and the Switchyard config the template writes (its string lines, with
/// the template's expressions filled in) is valid.
#[test]
fn the_bicep_parameters_exist_and_its_config_is_valid() {
    let bicep = std::fs::read_to_string("infra/azure/main.bicep").unwrap();
    let params: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("infra/azure/main.parameters.json").unwrap())
            .unwrap();
    for name in params["parameters"].as_object().unwrap().keys() {
        assert!(
            bicep
                .lines()
                .any(|l| l.starts_with(&format!("param {name} "))),
            "{name} is set in main.parameters.json but not declared in main.bicep"
        );
    }
    // The quoted lines of a block: `var backendLines` (one backend) and `var config`.
    let block = |start: &str, end: &str| -> Vec<String> {
        let from = bicep.find(start).unwrap();
        let to = from + bicep[from..].find(end).unwrap();
        bicep[from..to]
            .lines()
            .map(str::trim)
            .filter(|l| l.len() >= 2 && l.starts_with('\'') && l.ends_with('\''))
            .map(|l| l[1..l.len() - 1].to_string())
            .collect()
    };
    let backend = block("var backendLines", "var storeLines").join("\n");
    let mut text = block("var config", "], backendLines").join("\n");
    text.push('\n');
    // With a client key, the consumer the template adds after the backends.
    let consumer = block("], backendLines, empty(clientKey)", "], storeLines)").join("\n");
    assert!(consumer.contains("[[consumers]]"), "{consumer}");
    // With more than one replica, the Azure Managed Redis the template makes.
    let store = block("var storeLines", "var config")
        .join("\n")
        .replace(
            "${redis.properties.hostName}",
            "switchyard-redis-abc123.eastus.redis.azure.net",
        )
        .replace(
            "${identity.properties.clientId}",
            "00000000-0000-0000-0000-000000000003",
        )
        .replace(
            "${identity.properties.principalId}",
            "00000000-0000-0000-0000-000000000004",
        );
    for name in ["eastus", "westus"] {
        text.push_str(
            &backend
                .replace("${inst.name}", name)
                .replace("${namePrefix}", "switchyard")
                .replace("${suffix}", "abc123")
                .replace(
                    "${identity.properties.clientId}",
                    "00000000-0000-0000-0000-000000000003",
                ),
        );
        text.push('\n');
    }
    // Bicep's escaped `\${` is Switchyard's `${`.
    let text = text.replace("\\${", "${");
    assert!(
        !text.contains("${inst") && !text.contains("${identity"),
        "{text}"
    );
    let lookup = |name: &str| match name {
        "SWITCHYARD_ADMIN_KEY" => Some("0123456789abcdef-admin".to_string()),
        "SWITCHYARD_CLIENT_KEY" => Some("0123456789abcdef-client".to_string()),
        _ => None,
    };
    let with_key = format!("{text}\n{}\n", consumer.replace("\\${", "${"));
    let cfg = switchyard::config::Config::parse(&with_key, &lookup)
        .unwrap_or_else(|e| panic!("{e}\n{with_key}"));
    assert_eq!(cfg.consumers.len(), 1);
    let cfg =
        switchyard::config::Config::parse(&text, &lookup).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(cfg.backends.len(), 2);
    assert_eq!(cfg.backends[0].auth.kind(), "managed_identity");
    assert_eq!(cfg.server.admin_listen.unwrap().port(), 9090);
    let scaled = format!("{text}\n{store}\n");
    let cfg = switchyard::config::Config::parse(&scaled, &lookup)
        .unwrap_or_else(|e| panic!("{e}\n{scaled}"));
    let switchyard::config::LimitStore::Redis(r) = &cfg.limits.store else {
        panic!("a shared store: {scaled}")
    };
    assert!(r.cluster && r.auth.is_some());
    assert_eq!(
        r.user.as_deref(),
        Some("00000000-0000-0000-0000-000000000004")
    );
    assert!(bicep.contains("var sharedStore = maxReplicas > 1"));
    assert!(bicep.contains("port: 9090"), "probes on the admin port");
    assert!(bicep.contains("targetPort: 8080"));
    // Open to the internet only with a client key; one replica by default.
    assert!(bicep.contains("external: !empty(clientKey)"));
    assert!(bicep.contains("param maxReplicas int = 1"));
    assert_eq!(params["parameters"]["maxReplicas"]["value"], 1);
}

/// `switchyard demo --once`: the load run's table, then the stateful calls, each served by the
/// instance holding its object, and exit 0.
#[test]
fn the_demo_runs_and_keeps_objects_on_their_instance() {
    let out = Command::new(BIN)
        .args([
            "demo",
            "--once",
            "--requests",
            "40",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("client-visible success: 40/40"), "{stdout}");
    let served_by = |prefix: &str| -> Vec<String> {
        stdout
            .lines()
            .filter(|l| l.trim_start().starts_with(prefix))
            .filter_map(|l| l.rsplit("-> ").next())
            .map(|b| b.split_whitespace().next().unwrap_or("").to_string())
            .collect()
    };
    let file = served_by("file ");
    let batch = served_by("batch ");
    assert_eq!(file.len(), 1, "{stdout}");
    assert!(
        batch.len() == 2 && batch.iter().all(|b| *b == file[0]),
        "{stdout}"
    );
    assert_eq!(served_by("output file "), file, "{stdout}");
    let turns = served_by("response turn ");
    assert_eq!(turns.len(), 4, "{stdout}");
    assert!(turns.iter().all(|b| *b == turns[0]), "{stdout}");
    assert_eq!(served_by("retrieved the last response"), [turns[0].clone()]);
}

/// Listening beyond loopback with no client keys is allowed, and said at start: such a gateway
/// serves anyone who reaches it on its owner's quota.
#[test]
fn an_open_gateway_says_so_at_start() {
    let text = valid().replacen("listen = \"127.0.0.1:0\"", "listen = \"0.0.0.0:0\"", 1);
    let p = write_config(&tmp("open"), &text);
    let mut child = serve_text_logs(&p);
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("beyond loopback") {
                let _ = tx.send(line);
                return;
            }
        }
    });
    let warned = rx.recv_timeout(std::time::Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    let line = warned.expect("a warning at start");
    assert!(
        line.contains("WARN") && line.contains("no [[consumers]]"),
        "{line}"
    );
}
