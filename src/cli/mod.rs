//! The command line: `serve`, `check`, `simulate`, `probe`, `demo`, `health`. `main.rs` only
//! sets the allocator and calls [`main`]. This is the one module that prints to the terminal;
//! everything else logs.
#![expect(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "the command line's own output: tables, reports, errors before logging starts"
)]

pub mod demo;
pub mod probe;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::server::ThreadChore;
use crate::sim::{Faults, SimConfig, Simulator};

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
        #[arg(long, default_value = "60s", value_parser = crate::config::parse_duration)]
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
    /// A model's context window, `name=tokens` (repeatable): longer chat completions get
    /// 400 `context_length_exceeded`.
    #[arg(long = "context-window", value_parser = parse_context_window)]
    context_windows: Vec<(String, u32)>,
}

fn parse_context_window(s: &str) -> Result<(String, u32), String> {
    let (name, tokens) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected name=tokens"))?;
    let tokens = tokens
        .trim()
        .parse()
        .map_err(|e| format!("{s:?}: the token count: {e}"))?;
    Ok((name.trim().to_string(), tokens))
}

/// Parses the command line and runs it. `chore`: what each of `serve`'s runtime threads does
/// for itself at a steady pace (the binary gives back its allocator's thread cache).
pub fn main(chore: Option<ThreadChore>) -> ExitCode {
    let cli = Cli::parse();
    crate::install_crypto_provider();
    let default_log = match cli.command {
        Command::Demo { .. } | Command::Probe { .. } | Command::Health { .. } => "warn",
        _ => "info",
    };
    let json = cli
        .log_format
        .clone()
        .or_else(|| std::env::var("SWITCHYARD_LOG_FORMAT").ok())
        .is_some_and(|f| f == "json");
    crate::telemetry::init_logging(default_log, json);
    let threads = std::env::var("SWITCHYARD_WORKERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    if matches!(cli.command, Command::Serve { .. }) {
        // One single-threaded runtime per core, this thread's among them.
        let command = cli.command;
        let serve =
            |workers: Vec<tokio::runtime::Handle>| async move { run(command, &workers).await };
        return match crate::server::per_core(threads, chore, serve) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: cannot start the runtimes: {e}");
                ExitCode::FAILURE
            }
        };
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
        Command::Health { url } => match probe::health(&url, Duration::from_secs(3)).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("unhealthy: {e}");
                ExitCode::FAILURE
            }
        },
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
            let source = crate::server::ConfigSource::file(config.clone());
            match crate::server::start_on(cfg, Some(source), shutdown, workers).await {
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
                context_windows: a.context_windows,
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
                .map(|h| probe::Target::header(h))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let client = match crate::http_client::system_client(Duration::from_secs(10), true) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: cannot build an HTTP client: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let target = probe::Target {
                url: probe::Target::azure(&url, &deployment, &api_version),
                key,
                stream_every: usize::from(stream || without_include_usage),
                include_usage: !without_include_usage,
                headers,
                timeout,
            };
            let stop = stop_on_signal();
            let outcomes = probe::drive(&client, &target, requests, concurrency, &stop).await;
            let report = probe::report(&outcomes);
            if json {
                println!("{report}");
            } else {
                probe::print_report(&report);
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
            let opts = demo::DemoOptions {
                requests,
                concurrency,
                once,
                listen,
                admin_listen,
            };
            match demo::run(opts, shutdown).await {
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
