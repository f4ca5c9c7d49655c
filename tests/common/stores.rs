//! Real Redis servers for the scale-out tests, started from Debian's `redis-server` on free
//! loopback ports and killed on drop: plain, TLS (certificates made here), with ACL users, and a
//! three-node Redis Cluster joined with `redis-cli --cluster create`. Also the PKI and temp
//! directories the TLS tests share.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

use super::free_port;

/// A CA and a certificate it issued for `localhost` and 127.0.0.1, as PEM.
pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn pki(name: &str) -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert_pem: leaf.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A directory of its own under the system's temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "switchyard-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn write(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `redis-server` arguments for TLS on `port` with `pki`'s certificate, written into `files`;
/// clients need not present certificates.
fn tls_args(files: &TempDir, pki: &Pki, port: u16) -> Vec<String> {
    let cert = files.write("redis.crt", &pki.cert_pem);
    let key = files.write("redis.key", &pki.key_pem);
    let ca = files.write("ca.crt", &pki.ca_pem);
    [
        "--tls-port",
        &port.to_string(),
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Whether `program` runs; in CI a missing one fails the test, elsewhere it is skipped loudly.
fn installed(program: &str, package: &str) -> bool {
    if Command::new(program).arg("--version").output().is_ok() {
        return true;
    }
    assert!(
        std::env::var("CI").is_err(),
        "{program} is not installed (CI installs {package} in .ci/run)"
    );
    eprintln!(
        "\n*** SKIPPED: {program} is not installed; `apt-get install {package}` to run this test ***\n"
    );
    false
}

/// A `redis-server` on a free loopback port, killed on drop. Its plain port always listens,
/// for the test's own commands; `tls_port` when started with TLS. `None` (after saying so
/// loudly) when the binary is missing outside CI; in CI a missing binary fails the test.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    pub tls_port: Option<u16>,
    /// The test's own sign-in (`requirepass`), if the default user has a password.
    admin_password: Option<String>,
    _dir: TempDir,
}

impl RedisServer {
    pub fn start(port: Option<u16>) -> Option<RedisServer> {
        Self::spawn(port, &[], None)
    }

    /// With `args` added; `admin_password`: the default user's password, set by the caller
    /// with `--requirepass`, for the test's own commands.
    pub fn spawn(
        port: Option<u16>,
        args: &[String],
        admin_password: Option<&str>,
    ) -> Option<RedisServer> {
        if !installed("redis-server", "redis-server") {
            return None;
        }
        let port = port.unwrap_or_else(free_port);
        let dir = TempDir::new();
        let tls_port = args
            .iter()
            .position(|a| a == "--tls-port")
            .and_then(|i| args.get(i + 1))
            .map(|p| p.parse().unwrap());
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--dir", &dir.0.display().to_string()])
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let server = RedisServer {
            child,
            port,
            tls_port,
            admin_password: admin_password.map(str::to_string),
            _dir: dir,
        };
        // Ready once it answers PING; bounded by a deadline.
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.try_cmd(&["PING"]).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    /// TLS on a port of its own (clients need not present certificates), with `pki`'s
    /// certificate for `localhost` and 127.0.0.1.
    pub fn tls(pki: &Pki) -> Option<(RedisServer, TempDir)> {
        let files = TempDir::new();
        let args = tls_args(&files, pki, free_port());
        Some((Self::spawn(None, &args, None)?, files))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs one command as the test's own user.
    pub fn try_cmd(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let url = match &self.admin_password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => self.url(),
        };
        let client = redis::Client::open(url)?;
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut conn)
    }

    pub fn cmd(&self, args: &[&str]) -> redis::Value {
        self.try_cmd(args)
            .unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    /// A command whose answer is text (`INFO`, `CLIENT LIST`).
    pub fn text(&self, args: &[&str]) -> String {
        match self.cmd(args) {
            redis::Value::BulkString(b) => String::from_utf8(b).unwrap(),
            redis::Value::VerbatimString { text, .. } => text,
            other => panic!("redis {args:?}: {other:?}"),
        }
    }

    /// How many times `command` ran on this server (`INFO commandstats`).
    pub fn calls(&self, command: &str) -> u64 {
        let info = self.text(&["INFO", "commandstats"]);
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .map(|n| n.parse().unwrap())
            .unwrap_or(0)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A three-node Redis Cluster on loopback (masters only), every slot assigned.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    _files: TempDir,
}

/// What a cluster's nodes have beyond plain ports and no password.
#[derive(Default, Clone, Copy)]
pub struct ClusterOptions<'a> {
    /// TLS on ports of their own (and between the nodes), with this certificate.
    pub tls: Option<&'a Pki>,
    /// The default user's password (`requirepass`), for the test's own commands.
    pub password: Option<&'a str>,
}

impl RedisCluster {
    pub fn start() -> Option<RedisCluster> {
        Self::start_on([free_port(), free_port(), free_port()])
    }

    /// On these ports (a cluster started again where one was).
    pub fn start_on(ports: [u16; 3]) -> Option<RedisCluster> {
        Self::start_with(ports, ClusterOptions::default())
    }

    pub fn start_with(ports: [u16; 3], opts: ClusterOptions<'_>) -> Option<RedisCluster> {
        if !installed("redis-cli", "redis-tools") {
            return None;
        }
        let files = TempDir::new();
        let mut nodes = Vec::new();
        for port in ports {
            let mut args: Vec<String> = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &format!("nodes-{port}.conf"),
                "--cluster-port",
                &free_port().to_string(),
                "--cluster-node-timeout",
                "5000",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if let Some(pki) = opts.tls {
                args.extend(tls_args(&files, pki, free_port()));
                args.extend(["--tls-cluster".to_string(), "yes".to_string()]);
            }
            if let Some(p) = opts.password {
                args.extend(["--requirepass".to_string(), p.to_string()]);
            }
            nodes.push(RedisServer::spawn(Some(port), &args, opts.password)?);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut create = Command::new("redis-cli");
        if let Some(p) = opts.password {
            create.args(["-a", p, "--no-auth-warning"]);
        }
        let out = create
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Formed once every node has every slot and knows the others.
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in &nodes {
            loop {
                let info = n.text(&["CLUSTER", "INFO"]);
                if info.contains("cluster_state:ok")
                    && info.contains("cluster_slots_assigned:16384")
                    && info.contains("cluster_known_nodes:3")
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster did not form: {info}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Some(RedisCluster {
            nodes,
            _files: files,
        })
    }

    pub fn ports(&self) -> [u16; 3] {
        [self.nodes[0].port, self.nodes[1].port, self.nodes[2].port]
    }

    /// One node's URL: the gateway finds the others.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// One node's TLS URL, by the name its certificate has.
    pub fn tls_url(&self) -> String {
        format!("rediss://localhost:{}", self.nodes[0].tls_port.unwrap())
    }

    /// The keys each node holds.
    pub fn keys_per_node(&self) -> Vec<Vec<String>> {
        self.nodes
            .iter()
            .map(|n| match n.cmd(&["KEYS", "*"]) {
                redis::Value::Array(v) => v
                    .into_iter()
                    .map(|k| match k {
                        redis::Value::BulkString(b) => String::from_utf8(b).unwrap(),
                        other => panic!("{other:?}"),
                    })
                    .collect(),
                other => panic!("{other:?}"),
            })
            .collect()
    }
}
