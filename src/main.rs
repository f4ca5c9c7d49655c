//! The `switchyard` command: parse the command line, load config, run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use switchyard::config::Config;
use switchyard::sim::{Faults, SimConfig, Simulator};
use tokio_util::sync::CancellationToken;

// jemalloc with background purging: about 10 % fewer instructions per proxied request than
// glibc's malloc (callgrind, bench/results/), and the memory of a burst (2,000 open streams)
// goes back to the system within seconds, where glibc kept all of it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// How often each of `serve`'s runtime threads gives back its allocator cache.
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Hands what jemalloc keeps cached for this thread back to its arena. A thread cache holds
/// freed blocks for the thread's next allocations, and an idle thread never empties it: after
/// a burst (2,000 streams) that kept about 0.7 MB resident for good, the regions holding
/// partly used pages in place. Turning the cache off flushes it; back on, it starts empty and
/// refills as the thread allocates. Safe mallctl names only (the crate forbids
/// `unsafe`). A cache turned off (`_RJEM_MALLOC_CONF=tcache:false`) stays off.
fn trim_thread_cache() -> tikv_jemalloc_ctl::Result<()> {
    use tikv_jemalloc_ctl::{Access, AsName};
    let enabled = b"thread.tcache.enabled\0".name();
    if !enabled.read()? {
        return Ok(());
    }
    enabled.write(false)?;
    enabled.write(true)
}

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "A self-hosted gateway for Azure OpenAI"
)]
struct Cli {
    /// Log lines as JSON (one object per line) instead of text; also SWITCHYARD_LOG_FORMAT=json.
    #[arg(long, global = true, value_parser = ["text", "json"])]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and print a summary (secrets masked); exit 0 if valid, 1 if not.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run one simulated Azure OpenAI instance.
    Simulate(SimulateArgs),
    /// Send chat completions to an Azure OpenAI-compatible endpoint (a Switchyard or Azure itself)
    /// and report where they went, statuses, latency and tokens. Exit 1 unless all succeeded.
    Probe {
        /// Base URL: the gateway (http://127.0.0.1:8080) or https://<resource>.openai.azure.com.
        #[arg(long)]
        url: String,
        #[arg(long)]
        deployment: String,
        /// Sent as `api-key` (a consumer key for a Switchyard, the resource key for Azure).
        #[arg(long)]
        key: Option<String>,
        #[arg(long, default_value_t = 20)]
        requests: usize,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Stream every answer.
        #[arg(long)]
        stream: bool,
        /// Stream without asking for the usage chunk (`stream_options.include_usage`), as the
        /// OpenAI SDKs do by default; a Switchyard asks for it itself and strips it, so no
        /// tokens are reported for such streams.
        #[arg(long)]
        without_include_usage: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "2024-10-21")]
        api_version: String,
        /// Sent with every request too, as `name: value` (repeatable), e.g. the headers an
        /// SDK adds.
        #[arg(long = "header", value_name = "NAME: VALUE")]
        headers: Vec<String>,
        /// Longest a request may take, answer and body, e.g. `60s`, `500ms`.
        #[arg(long, default_value = "60s", value_parser = switchyard::config::parse_duration)]
        timeout: Duration,
    },
    /// Exit 0 when URL answers 2xx within 3 s, else 1: a health check for container images
    /// without curl (Docker's HEALTHCHECK).
    Health {
        #[arg(long, default_value = "http://127.0.0.1:9090/healthz")]
        url: String,
    },
    /// Three simulated backends, the gateway in front, a load run and a table.
    Demo {
        /// How many chat requests to send.
        #[arg(long, default_value_t = 300)]
        requests: usize,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Exit after the table instead of serving until Ctrl-C.
        #[arg(long)]
        once: bool,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
    },
}

#[derive(clap::Args)]
struct SimulateArgs {
    #[arg(long, default_value = "127.0.0.1:18001")]
    listen: SocketAddr,
    /// Region name reported in `x-ms-region`.
    #[arg(long, default_value = "sim")]
    name: String,
    /// Require this key in `api-key` (or `Authorization: Bearer`).
    #[arg(long)]
    api_key: Option<String>,
    /// Time to first token, in milliseconds.
    #[arg(long, default_value_t = 0)]
    ttft_ms: u64,
    /// Time between tokens, in milliseconds.
    #[arg(long, default_value_t = 0)]
    token_ms: u64,
    /// Tokens in an answer unless max_tokens is lower.
    #[arg(long, default_value_t = 16)]
    completion_tokens: u32,
    /// Tokens-per-minute limit (429 beyond it).
    #[arg(long)]
    tpm: Option<u32>,
    /// Requests-per-minute limit, enforced per 10 s like Azure.
    #[arg(long)]
    rpm: Option<u32>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Share of requests answered with --error-status.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    #[arg(long, default_value_t = 500)]
    error_status: u16,
    /// Share of requests whose connection drops (mid-stream for streams).
    #[arg(long, default_value_t = 0.0)]
    drop_rate: f64,
    /// Share of requests never answered.
    #[arg(long, default_value_t = 0.0)]
    stall_rate: f64,
    /// Wait asked for by injected 429/503 answers, in milliseconds (`retry-after: 1` if unset).
    #[arg(long)]
    retry_after_ms: Option<u64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    switchyard::install_crypto_provider();
    let default_log = match cli.command {
        Command::Demo { .. } | Command::Probe { .. } | Command::Health { .. } => "warn",
        _ => "info",
    };
    let json = cli
        .log_format
        .clone()
        .or_else(|| std::env::var("SWITCHYARD_LOG_FORMAT").ok())
        .is_some_and(|f| f == "json");
    switchyard::telemetry::init_logging(default_log, json);
    let threads = std::env::var("SWITCHYARD_WORKERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    if matches!(cli.command, Command::Serve { .. }) {
        // One single-threaded runtime per core, this thread's among them (see
        // `switchyard::server::Workers`).
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        let runtime = match runtime {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("error: cannot start the async runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        let chore = switchyard::server::ThreadChore {
            every: TRIM_EVERY,
            run: std::sync::Arc::new(|| {
                if let Err(e) = trim_thread_cache() {
                    tracing::warn!(error = %e, "cannot flush the thread's allocator cache");
                }
            }),
        };
        let workers = match switchyard::server::Workers::start(threads - 1, Some(chore.clone())) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("error: cannot start the worker threads: {e}");
                return ExitCode::FAILURE;
            }
        };
        let code = runtime.block_on(async {
            tokio::select! {
                code = run(cli.command, workers.handles()) => code,
                never = chore.repeat() => match never {},
            }
        });
        workers.stop();
        return code;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli.command, &[]))
}

/// `workers`: runtimes that serve the gateway's client connections beside this one.
async fn run(command: Command, workers: &[tokio::runtime::Handle]) -> ExitCode {
    match command {
        Command::Health { url } => {
            match switchyard::probe::health(&url, Duration::from_secs(3)).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("unhealthy: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!("{}: valid\n\n{}", config.display(), c.summary());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: invalid: {e}", config.display());
                ExitCode::FAILURE
            }
        },
        Command::Serve { config } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {}: {e}", config.display());
                    return ExitCode::FAILURE;
                }
            };
            let shutdown = stop_on_signal();
            let source = switchyard::server::ConfigSource::file(config.clone());
            match switchyard::server::start_on(cfg, Some(source), shutdown, workers).await {
                Ok(gw) => {
                    gw.wait().await;
                    tracing::info!("stopped");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Simulate(a) => {
            let cfg = SimConfig {
                name: a.name,
                api_key: a.api_key,
                accepted_tokens: None,
                ttft: Duration::from_millis(a.ttft_ms),
                token_interval: Duration::from_millis(a.token_ms),
                completion_tokens: a.completion_tokens,
                tokens_per_minute: a.tpm,
                requests_per_minute: a.rpm,
                initial_fill: 1.0,
                seed: a.seed,
                record: false,
                tls: None,
                object_delay: Duration::from_secs(2),
                faults: Faults {
                    error_rate: a.error_rate,
                    error_status: a.error_status,
                    drop_rate: a.drop_rate,
                    stall_rate: a.stall_rate,
                    refuse: false,
                    retry_after_ms: a.retry_after_ms,
                },
            };
            let shutdown = stop_on_signal();
            match Simulator::start(cfg, a.listen).await {
                Ok(sim) => {
                    tracing::info!(url = %sim.url(), name = sim.name(), "simulator listening");
                    shutdown.cancelled().await;
                    sim.stop().await;
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: cannot listen on {}: {e}", a.listen);
                    ExitCode::FAILURE
                }
            }
        }
        Command::Probe {
            url,
            deployment,
            key,
            requests,
            concurrency,
            stream,
            without_include_usage,
            json,
            api_version,
            headers,
            timeout,
        } => {
            let headers = match headers
                .iter()
                .map(|h| switchyard::probe::Target::header(h))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let client = match switchyard::upstream::system_client(Duration::from_secs(10), true) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: cannot build an HTTP client: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let target = switchyard::probe::Target {
                url: switchyard::probe::Target::azure(&url, &deployment, &api_version),
                key,
                stream_every: usize::from(stream || without_include_usage),
                include_usage: !without_include_usage,
                headers,
                timeout,
            };
            let stop = stop_on_signal();
            let outcomes =
                switchyard::probe::drive(&client, &target, requests, concurrency, &stop).await;
            let report = switchyard::probe::report(&outcomes);
            if json {
                println!("{report}");
            } else {
                switchyard::probe::print_report(&report);
            }
            if report["succeeded"] == report["requests"] && requests > 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Demo {
            requests,
            concurrency,
            once,
            listen,
            admin_listen,
        } => {
            let shutdown = stop_on_signal();
            let opts = switchyard::demo::DemoOptions {
                requests,
                concurrency,
                once,
                listen,
                admin_listen,
            };
            match switchyard::demo::run(opts, shutdown).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// A token cancelled by Ctrl-C or SIGTERM.
fn stop_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    // Lives as long as the process; it only waits for a signal.
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        t.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("stop signal received; draining");
        t.cancel();
    });
    token
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use tikv_jemalloc_ctl::{Access, AsName};

    /// The names and value types are right (jemalloc answers them) and the cache is on after.
    #[test]
    fn trimming_leaves_the_thread_cache_on() {
        let enabled = b"thread.tcache.enabled\0".name();
        let before: bool = enabled.read().unwrap();
        assert!(before);
        let big: Vec<Vec<u8>> = (0..1000).map(|i| vec![0; 64 + i % 512]).collect();
        drop(big);
        super::trim_thread_cache().unwrap();
        let after: bool = enabled.read().unwrap();
        assert!(after);
        // Off stays off.
        enabled.write(false).unwrap();
        super::trim_thread_cache().unwrap();
        let off: bool = enabled.read().unwrap();
        assert!(!off);
        enabled.write(true).unwrap();
    }
}
