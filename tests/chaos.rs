//! Chaos under load: steady mixed traffic (plain and streamed) through three simulated
//! backends while a driver kills and restarts them and flips their fault modes at random.
//!
//! Every request that had a backend it could have been served by gets served; the others get
//! only the documented answers. A request "could have been served" when some backend was
//! healthy (running, no fault) for the whole of it and for `SETTLE` before it, the longest any
//! penalty the gateway learned (cooldown, open circuit) can last here. A request whose own
//! serving backend went bad while it ran may fail the documented way (a stream ends with an
//! error event): nothing is retried once a response has started.
//!
//! `cargo test --test chaos` runs 10 s; the full run is
//! `CHAOS_SECS=60 cargo test --release --test chaos -- --nocapture` (summary on stderr).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests fail loudly by design, and print what they measured"
)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use switchyard::rng::SplitMix64;
use switchyard::sim::{Faults, SimConfig, Simulator};

/// Cooldowns are capped at 1 s and circuits trip for 500 ms (config below); a restarted
/// backend takes one more probe round to be trusted again.
const SETTLE: Duration = Duration::from_millis(1500);
const BACKENDS: usize = 3;

/// When each backend went healthy (true) or not (false).
#[derive(Default)]
struct Timeline(Mutex<Vec<Vec<(Instant, bool)>>>);

impl Timeline {
    fn set(&self, i: usize, healthy: bool) {
        self.0.lock().unwrap()[i].push((Instant::now(), healthy));
    }

    /// Healthy over the whole of `from..=to`.
    fn healthy(&self, i: usize, from: Instant, to: Instant) -> bool {
        let t = self.0.lock().unwrap();
        let events = &t[i];
        let at_start = events
            .iter()
            .rev()
            .find(|(when, _)| *when <= from)
            .is_some_and(|(_, h)| *h);
        at_start
            && events
                .iter()
                .all(|(when, h)| *when <= from || *when > to || *h)
    }

    fn index_of(name: &str) -> Option<usize> {
        name.strip_prefix('s')?.parse().ok()
    }
}

#[derive(Debug)]
struct Outcome {
    start: Instant,
    end: Instant,
    stream: bool,
    status: Option<u16>,
    backend: String,
    retry_after: bool,
    /// A 200 whose body arrived whole (JSON parsed, or a stream ending in `[DONE]`).
    complete: bool,
    detail: String,
}

fn sim_config(i: usize) -> SimConfig {
    SimConfig {
        token_interval: Duration::from_millis(2),
        completion_tokens: 12,
        seed: 7 + i as u64,
        ..sim(&format!("s{i}"))
    }
}

enum Slot {
    Up(Simulator),
    Down,
}

async fn driver(
    mut slots: Vec<Slot>,
    addrs: Vec<SocketAddr>,
    timeline: Arc<Timeline>,
    until: Instant,
) -> Vec<Slot> {
    let mut rng = SplitMix64::new(0x5eed);
    let mut actions = 0;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200 + rng.next_u64() % 400)).await;
        let i = (rng.next_u64() % BACKENDS as u64) as usize;
        let roll = rng.next_u64() % 10;
        actions += 1;
        slots[i] = match std::mem::replace(&mut slots[i], Slot::Down) {
            Slot::Up(s) => match roll {
                0 => {
                    // Killed: open connections are cut, connects refused.
                    timeline.set(i, false);
                    s.stop().await;
                    Slot::Down
                }
                1..=4 => {
                    let faults = match rng.next_u64() % 6 {
                        0 => Faults {
                            error_rate: 1.0,
                            error_status: [500, 502, 503, 504][(rng.next_u64() % 4) as usize],
                            ..Faults::default()
                        },
                        1 => Faults {
                            error_rate: 0.7,
                            error_status: 429,
                            retry_after_ms: Some(200 + rng.next_u64() % 800),
                            ..Faults::default()
                        },
                        2 => Faults {
                            stall_rate: 0.5,
                            ..Faults::default()
                        },
                        3 => Faults {
                            drop_rate: 0.5,
                            ..Faults::default()
                        },
                        4 => Faults {
                            refuse: true,
                            ..Faults::default()
                        },
                        _ => Faults {
                            error_rate: 0.3,
                            error_status: 500,
                            drop_rate: 0.3,
                            ..Faults::default()
                        },
                    };
                    timeline.set(i, false);
                    s.set_faults(faults).await;
                    Slot::Up(s)
                }
                _ => {
                    s.set_faults(Faults::default()).await;
                    timeline.set(i, true);
                    Slot::Up(s)
                }
            },
            Slot::Down => {
                if roll < 6 {
                    let s = Simulator::start(sim_config(i), addrs[i]).await.unwrap();
                    timeline.set(i, true);
                    Slot::Up(s)
                } else {
                    Slot::Down
                }
            }
        };
    }
    eprintln!("chaos driver: {actions} actions");
    slots
}

async fn one_request(c: &reqwest::Client, base: &str, stream: bool) -> Outcome {
    let start = Instant::now();
    let sent = c
        .post(format!("{base}{CHAT}"))
        .header("content-type", "application/json")
        .body(chat_body(stream))
        .send()
        .await;
    let mut out = Outcome {
        start,
        end: start,
        stream,
        status: None,
        backend: String::new(),
        retry_after: false,
        complete: false,
        detail: String::new(),
    };
    match sent {
        Err(e) => out.detail = format!("no answer: {e}"),
        Ok(r) => {
            out.status = Some(r.status().as_u16());
            out.backend = header(&r, "x-switchyard-backend");
            out.retry_after = r.headers().contains_key("retry-after");
            match r.text().await {
                Err(e) => out.detail = format!("body failed: {e}"),
                Ok(body) => {
                    out.complete = out.status == Some(200)
                        && if stream {
                            body.ends_with("data: [DONE]\n\n")
                        } else {
                            serde_json::from_str::<serde_json::Value>(&body)
                                .is_ok_and(|v| v["choices"].is_array())
                        };
                    out.detail = body.chars().rev().take(200).collect::<String>();
                    out.detail = out.detail.chars().rev().collect();
                }
            }
        }
    }
    out.end = Instant::now();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_loses_nothing_that_could_be_served() {
    let secs: u64 = std::env::var("CHAOS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let timeline = Arc::new(Timeline(Mutex::new(vec![Vec::new(); BACKENDS])));
    let mut slots = Vec::new();
    let mut addrs = Vec::new();
    let mut backends = Vec::new();
    for i in 0..BACKENDS {
        let s = start_sim(sim_config(i)).await;
        addrs.push(s.addr());
        backends.push(B::sim(&s));
        timeline.set(i, true);
        slots.push(Slot::Up(s));
    }
    let gw = gateway(
        &backends,
        "max_attempts = 3\nfirst_byte_timeout = \"1s\"\nidle_timeout = \"1s\"\nrequest_timeout = \"10s\"\ndefault_cooldown = \"500ms\"\nmax_cooldown = \"1s\"\ncircuit_breaker = { failures = 3, interval = \"5s\", trip_duration = \"500ms\" }",
        "",
    )
    .await;
    let until = Instant::now() + Duration::from_secs(secs);
    let chaos = tokio::spawn(driver(slots, addrs.clone(), timeline.clone(), until));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let mut load = tokio::task::JoinSet::new();
    for w in 0..8 {
        let base = gw.base.clone();
        let outcomes = outcomes.clone();
        load.spawn(async move {
            let c = client();
            let mut n = 0u64;
            while Instant::now() < until {
                let o = one_request(&c, &base, (w + n).is_multiple_of(3)).await;
                outcomes.lock().unwrap().push(o);
                n += 1;
            }
        });
    }
    while load.join_next().await.is_some() {}
    let slots = chaos.await.unwrap();

    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    let mut servable = 0;
    let mut served = 0;
    let mut excused = std::collections::BTreeMap::<String, usize>::new();
    let mut lost = Vec::new();
    for o in &outcomes {
        let from = o.start.checked_sub(SETTLE).unwrap_or(o.start);
        let could = (0..BACKENDS).any(|i| timeline.healthy(i, from, o.end));
        if could {
            servable += 1;
        }
        if o.complete {
            served += 1;
            continue;
        }
        let server_went_bad =
            Timeline::index_of(&o.backend).is_some_and(|i| !timeline.healthy(i, o.start, o.end));
        let documented = match o.status {
            Some(429) => o.retry_after,
            Some(503) => true,
            // A backend's own answer, passed on when no backend could do better, or the
            // gateway's when no attempt got an answer: 502 (connect or protocol error), 504
            // (timeout), the body's code naming the cause.
            Some(500 | 502 | 504) => true,
            // A stream that started and then broke: it ends with an error event.
            Some(200) => o.stream && o.detail.contains("\"error\""),
            _ => false,
        };
        if !documented || (could && !server_went_bad) {
            lost.push(o);
        } else {
            *excused
                .entry(format!("{:?} stream={}", o.status, o.stream))
                .or_default() += 1;
        }
    }
    eprintln!(
        "chaos: {} requests in {secs} s, {served} served whole, {servable} had a healthy backend throughout; excused: {excused:?}",
        outcomes.len()
    );
    assert!(
        lost.is_empty(),
        "{} requests lost:\n{}",
        lost.len(),
        lost.iter()
            .take(10)
            .map(|o| format!("{o:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        servable >= 50,
        "too few requests had a healthy backend: {servable}"
    );
    assert!(served > 0);

    // Everything back up: nothing stays in flight.
    let mut sims = Vec::new();
    for (i, slot) in slots.into_iter().enumerate() {
        match slot {
            Slot::Up(s) => {
                s.set_faults(Faults::default()).await;
                sims.push(s);
            }
            Slot::Down => sims.push(Simulator::start(sim_config(i), addrs[i]).await.unwrap()),
        }
    }
    let c = client();
    let settled = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if metric_value(&c, &gw.admin, "switchyard_in_flight_requests ").await == 0.0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(settled.is_ok(), "requests stayed in flight after the chaos");
    gw.stop().await;
    drop(sims);
}
