use std::time::Duration;

use http::{HeaderMap, StatusCode};
use tokio::time::Instant;

use super::*;

fn policy(strategy: Strategy, priority: &[u32], weight: &[u32]) -> Policy {
    Policy {
        strategy,
        priority: priority.to_vec(),
        weight: weight.to_vec(),
        default_cooldown: Duration::from_secs(10),
        max_cooldown: Duration::from_secs(60),
        breaker: CircuitBreakerConfig {
            failures: 3,
            interval: Duration::from_secs(10),
            trip_duration: Duration::from_secs(30),
        },
        drained: priority.iter().map(|_| AtomicBool::new(false)).collect(),
    }
}

fn table(p: Policy) -> Arc<Table> {
    Balancer::new(p).table("gpt-4o")
}

fn lease(t: &Arc<Table>, cands: &[usize], tried: &[bool]) -> Lease {
    match t.pick(cands, tried, Instant::now()) {
        Pick::Chosen(l) => l,
        Pick::Throttled { retry_after } => panic!("throttled for {retry_after:?}"),
        Pick::Unavailable { .. } => panic!("unavailable"),
    }
}

/// Picks `n` times, releasing each lease at once; counts per backend.
fn spread(t: &Arc<Table>, cands: &[usize], n: usize) -> Vec<usize> {
    let mut counts = vec![0; cands.iter().max().map_or(0, |m| m + 1)];
    for _ in 0..n {
        counts[lease(t, cands, &[]).backend()] += 1;
    }
    counts
}

fn respond(l: &mut Lease, status: u16, headers: &[(&'static str, &str)], ttfb_ms: u64) -> Verdict {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.insert(http::HeaderName::from_static(k), v.parse().unwrap());
    }
    l.report(
        Outcome::Response {
            status: StatusCode::from_u16(status).unwrap(),
            headers: &h,
            retryable: matches!(status, 408 | 429 | 500 | 502 | 503 | 504),
            ttfb: Duration::from_millis(ttfb_ms),
        },
        Instant::now(),
    )
}

#[test]
fn round_robin_is_exact() {
    let t = table(policy(Strategy::RoundRobin, &[1, 1, 1], &[1, 1, 1]));
    assert_eq!(spread(&t, &[0, 1, 2], 300), vec![100, 100, 100]);
}

#[test]
fn weighted_is_smooth_and_proportional() {
    let t = table(policy(Strategy::Weighted, &[1, 1, 1], &[5, 1, 1]));
    let mut seq = Vec::new();
    for _ in 0..700 {
        seq.push(lease(&t, &[0, 1, 2], &[]).backend());
    }
    let count = |b| seq.iter().filter(|&&x| x == b).count();
    assert_eq!((count(0), count(1), count(2)), (500, 100, 100));
    // Smooth: picks interleave (nginx's sequence for 5:1:1 is a a b a c a a), never the five
    // in a row a plain weighted rotation would give; runs only join across cycle ends.
    let longest = seq
        .chunk_by(|a, b| a == b)
        .filter(|run| run[0] == 0)
        .map(<[usize]>::len)
        .max()
        .unwrap();
    assert!(longest <= 4, "runs of {longest}");
}

#[test]
fn least_inflight_counts_held_leases_by_weight() {
    let t = table(policy(Strategy::LeastInflight, &[1, 1], &[2, 1]));
    let held: Vec<Lease> = (0..30).map(|_| lease(&t, &[0, 1], &[])).collect();
    let on0 = held.iter().filter(|l| l.backend() == 0).count();
    assert_eq!(on0, 20, "twice the weight, twice the concurrent requests");
    drop(held);
    let st = t.status(0, Instant::now()).unwrap();
    assert_eq!(st.in_flight, 0, "dropping a lease ends its in-flight count");
}

#[tokio::test(start_paused = true)]
async fn latency_avoids_the_slow_backend() {
    let t = table(policy(Strategy::Latency, &[1, 1, 1], &[1, 1, 1]));
    for (b, ms) in [(0, 500), (1, 20), (2, 25)] {
        loop {
            let mut l = lease(&t, &[0, 1, 2], &[]);
            if l.backend() == b {
                respond(&mut l, 200, &[], ms);
                break;
            }
            let ms = [500, 20, 25][l.backend()];
            respond(&mut l, 200, &[], ms);
        }
    }
    let counts = spread(&t, &[0, 1, 2], 300);
    assert_eq!(
        counts[0], 0,
        "{counts:?}: the slow one loses every comparison"
    );
    assert!(counts[1] > 100 && counts[2] > 50, "{counts:?}");
}

#[tokio::test(start_paused = true)]
async fn headroom_prefers_the_backend_with_room() {
    let t = table(policy(Strategy::Headroom, &[1, 1], &[1, 1]));
    let mut a = lease(&t, &[0, 1], &[]);
    let mut b = lease(&t, &[0, 1], &[]);
    assert_ne!(a.backend(), b.backend());
    let (tight, roomy) = if a.backend() == 0 {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    respond(tight, 200, &[("x-ratelimit-remaining-tokens", "60000")], 10);
    respond(tight, 200, &[("x-ratelimit-remaining-tokens", "3000")], 10);
    respond(roomy, 200, &[("x-ratelimit-remaining-tokens", "60000")], 10);
    respond(roomy, 200, &[("x-ratelimit-remaining-tokens", "50000")], 10);
    drop((a, b));
    let counts = spread(&t, &[0, 1], 20);
    assert_eq!(counts, vec![0, 20]);
}

#[tokio::test(start_paused = true)]
async fn priority_spills_over_and_comes_back() {
    let t = table(policy(Strategy::RoundRobin, &[1, 2, 2], &[1, 1, 1]));
    assert_eq!(spread(&t, &[0, 1, 2], 10), vec![10, 0, 0]);
    let mut l = lease(&t, &[0, 1, 2], &[]);
    assert_eq!(l.backend(), 0);
    let v = respond(&mut l, 429, &[("retry-after-ms", "2000")], 5);
    assert_eq!(v, Verdict::CooledDown(Duration::from_secs(2)));
    drop(l);
    assert_eq!(
        spread(&t, &[0, 1, 2], 10),
        vec![0, 5, 5],
        "the PTU group is throttled"
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(
        spread(&t, &[0, 1, 2], 10),
        vec![10, 0, 0],
        "back once it recovers"
    );
}

#[tokio::test(start_paused = true)]
async fn cooldowns_follow_hints_and_are_capped() {
    let t = table(policy(Strategy::RoundRobin, &[1, 1], &[1, 1]));
    let mut l = lease(&t, &[0, 1], &[]);
    assert_eq!(
        respond(&mut l, 429, &[], 5),
        Verdict::CooledDown(Duration::from_secs(10)),
        "default"
    );
    let mut l = lease(&t, &[0, 1], &[]);
    assert_eq!(
        respond(&mut l, 429, &[("retry-after", "86400")], 5),
        Verdict::CooledDown(Duration::from_secs(60)),
        "capped at max_cooldown"
    );
    // A 503 with a hint is a throttle; without one it is a failure.
    let t = table(policy(Strategy::RoundRobin, &[1, 1], &[1, 1]));
    let mut l = lease(&t, &[0, 1], &[]);
    assert_eq!(
        respond(&mut l, 503, &[("retry-after", "3")], 5),
        Verdict::CooledDown(Duration::from_secs(3))
    );
    let mut l = lease(&t, &[0, 1], &[]);
    assert_eq!(
        respond(&mut l, 503, &[], 5),
        Verdict::Failed {
            circuit_opened: false
        }
    );
}

#[tokio::test(start_paused = true)]
async fn exhaustion_reports_the_soonest_backend() {
    let t = table(policy(Strategy::RoundRobin, &[1, 2], &[1, 1]));
    let mut a = lease(&t, &[0, 1], &[]);
    respond(&mut a, 429, &[("retry-after-ms", "4000")], 5);
    let mut b = lease(&t, &[0, 1], &[]);
    respond(&mut b, 429, &[("retry-after-ms", "1500")], 5);
    match t.pick(&[0, 1], &[], Instant::now()) {
        Pick::Throttled { retry_after } => assert_eq!(retry_after, Duration::from_millis(1500)),
        _ => panic!("expected throttled"),
    }
    tokio::time::advance(Duration::from_millis(1500)).await;
    assert_eq!(
        lease(&t, &[0, 1], &[]).backend(),
        1,
        "the priority-2 backend is free first"
    );
}

#[tokio::test(start_paused = true)]
async fn open_circuits_make_a_deployment_unavailable_then_probe() {
    let t = table(policy(Strategy::RoundRobin, &[1], &[1]));
    for _ in 0..3 {
        let mut l = lease(&t, &[0], &[]);
        l.report(
            Outcome::Failure {
                elapsed: Duration::from_millis(1),
            },
            Instant::now(),
        );
    }
    match t.pick(&[0], &[], Instant::now()) {
        Pick::Unavailable { retry_after } => assert_eq!(retry_after, Some(Duration::from_secs(30))),
        _ => panic!("expected unavailable"),
    }
    tokio::time::advance(Duration::from_secs(30)).await;
    let mut probe = lease(&t, &[0], &[]);
    assert!(
        matches!(t.pick(&[0], &[], Instant::now()), Pick::Unavailable { .. }),
        "one probe at a time"
    );
    respond(&mut probe, 200, &[], 5);
    drop(probe);
    assert_eq!(
        t.status(0, Instant::now()).unwrap().circuit,
        CircuitState::Closed
    );
    drop(lease(&t, &[0], &[]));
}

#[test]
fn tried_backends_are_skipped_while_others_can_serve() {
    let t = table(policy(Strategy::RoundRobin, &[1, 1, 1], &[1, 1, 1]));
    for _ in 0..10 {
        let b = lease(&t, &[0, 1, 2], &[true, false, true]).backend();
        assert_eq!(b, 1);
    }
    // Everything tried: any ready backend may go again.
    let b = lease(&t, &[0, 1, 2], &[true, true, true]).backend();
    assert!(b < 3);
    // Candidates restrict the choice (a deployment only some backends serve).
    assert_eq!(spread(&t, &[2], 5), vec![0, 0, 5]);
}

#[test]
fn deployment_tables_are_separate_and_bounded() {
    let b = Balancer::new(policy(Strategy::RoundRobin, &[1, 1], &[1, 1]));
    let a = b.table("a");
    let mut l = lease(&a, &[0, 1], &[]);
    respond(&mut l, 429, &[("retry-after", "5")], 1);
    let other = b.table("b");
    assert_eq!(
        spread(&other, &[0, 1], 4),
        vec![2, 2],
        "health is per deployment"
    );
    for i in 0..(MAX_TABLES + 10) {
        b.table(&format!("made-up-{i}"));
    }
    assert!(b.tables().len() <= MAX_TABLES);
}

#[test]
fn invented_names_cannot_take_tracking_from_listed_deployments() {
    let b = Balancer::with_listed(
        policy(Strategy::RoundRobin, &[1, 1], &[1, 1]),
        [("gpt-4o", &[][..]), ("embed", &[][..])],
    );
    for i in 0..(MAX_TABLES + 10) {
        b.table(&format!("made-up-{i}"));
    }
    // Listed ones keep tables of their own, even first asked for after the flood.
    assert!(b.tracks("gpt-4o") && b.tracks("embed"));
    let t = b.table("embed");
    let mut l = lease(&t, &[0, 1], &[]);
    respond(&mut l, 429, &[("retry-after", "5")], 1);
    assert_eq!(spread(&b.table("embed"), &[0, 1], 2), vec![0, 2]);
    assert_eq!(
        spread(&b.table("gpt-4o"), &[0, 1], 4),
        vec![2, 2],
        "a listed deployment's state is its own"
    );
    assert!(!b.tracks("made-up-2000"));
    assert_eq!(b.tables().len(), MAX_TABLES + 2);
}

/// A deployment's own priorities and weights: backend 1 is the PTU for `gpt-4o` only, and
/// takes every `gpt-4o` request while it can; `embed` keeps the backends' own (0 first), and
/// spills to 1 when 0 is throttled. Weights apply per deployment too.
#[test]
fn a_deployment_may_rank_its_backends_its_own_way() {
    let b = Balancer::with_listed(
        policy(Strategy::Weighted, &[1, 2, 2], &[1, 1, 1]),
        [
            ("gpt-4o", &[(0, 2, 1), (1, 1, 1)][..]),
            ("embed", &[][..]),
            ("mini", &[(1, 1, 3), (2, 1, 1), (0, 2, 1)][..]),
        ],
    );
    assert_eq!(spread(&b.table("gpt-4o"), &[0, 1, 2], 4), vec![0, 4, 0]);
    assert_eq!(spread(&b.table("embed"), &[0, 1, 2], 4), vec![4, 0, 0]);
    assert_eq!(spread(&b.table("mini"), &[0, 1, 2], 8), vec![0, 6, 2]);
    let t = b.table("gpt-4o");
    let mut l = lease(&t, &[0, 1, 2], &[]);
    assert_eq!(l.backend(), 1);
    respond(&mut l, 429, &[("retry-after", "5")], 1);
    assert_eq!(
        spread(&b.table("gpt-4o"), &[0, 1, 2], 4),
        vec![2, 0, 2],
        "spills to its own next priority, where backend 0 now is"
    );
    assert_eq!(b.table("gpt-4o").ranks().priority(1), 1);
    assert_eq!(b.table("embed").ranks().priority(1), 2);
}

#[test]
fn drained_backends_take_no_new_requests() {
    let b = Balancer::new(policy(Strategy::RoundRobin, &[1, 1], &[1, 1]));
    let t = b.table("gpt-4o");
    assert!(b.set_drained(0, true));
    assert_eq!(spread(&t, &[0, 1], 4), vec![0, 4]);
    assert!(b.set_drained(1, true));
    assert!(matches!(
        t.pick(&[0, 1], &[], Instant::now()),
        Pick::Unavailable { .. }
    ));
    b.set_drained(0, false);
    b.set_drained(1, false);
    assert_eq!(spread(&t, &[0, 1], 4), vec![2, 2]);
    assert!(!b.set_drained(7, true));
}

#[tokio::test(start_paused = true)]
async fn a_reload_carries_state_and_leases_across_two_generations() {
    let rr = |n: usize| policy(Strategy::RoundRobin, &vec![1; n], &vec![1; n]);
    let g1 = Balancer::new(rr(3));
    let t1 = g1.table("gpt-4o");
    // Backend 1 is cooling down; backends 0 and 2 each hold a lease (a stream, say).
    let mut cooled = lease(&t1, &[1], &[]);
    respond(&mut cooled, 429, &[("retry-after", "30")], 5);
    drop(cooled);
    let on0 = lease(&t1, &[0], &[]);
    let on2 = lease(&t1, &[2], &[]);
    g1.set_drained(2, true);

    // Generation 2 drops backend 0 and reorders: old 1 → new 0, old 2 → new 1, plus a new one.
    let g2 = Balancer::new(rr(3));
    g2.inherit(&g1, &[None, Some(0), Some(1)]);
    let t2 = g2.table("gpt-4o");
    let st = |t: &Arc<Table>, i| t.status(i, Instant::now()).unwrap();
    assert!(matches!(st(&t2, 0).availability, Availability::Cooling(_)));
    assert!(g2.policy().is_drained(1), "the drained flag carried over");
    assert_eq!(
        st(&t2, 1).in_flight,
        1,
        "the open lease is counted here now"
    );
    assert_eq!(st(&t2, 2).in_flight, 0);

    // Generation 3 keeps everything in place.
    let g3 = Balancer::new(rr(3));
    g3.inherit(&g2, &[Some(0), Some(1), Some(2)]);
    let t3 = g3.table("gpt-4o");
    assert_eq!(st(&t3, 1).in_flight, 1);
    // The old leases end: one in the newest table, the removed backend's nowhere (no panic).
    drop(on2);
    drop(on0);
    assert_eq!(st(&t3, 1).in_flight, 0);
    assert_eq!(
        st(&t2, 1).in_flight,
        1,
        "retired tables are no longer touched"
    );
    // A lease taken from a retired table after the reload stays there.
    let late = lease(&t1, &[0], &[]);
    assert_eq!(st(&t1, 0).in_flight, 2);
    drop(late);
    assert_eq!(st(&t1, 0).in_flight, 1);
}
