use super::*;
use crate::config::Quota;

/// A settlement of `tokens` used, at no cost.
fn used(tokens: u64) -> Used {
    Used { tokens, cost: 0 }
}

fn limiter(limits: ConsumerLimits) -> Arc<ConsumerLimiter> {
    limiter_for(&limits, None, Instant::now()).unwrap()
}

fn at(s: &str) -> SystemTime {
    httpdate::parse_http_date(s).unwrap()
}

#[tokio::test(start_paused = true)]
async fn requests_per_minute() {
    let c = limiter(ConsumerLimits {
        requests_per_minute: Some(60),
        ..Default::default()
    });
    let wall = SystemTime::now();
    for i in 0..60 {
        let (r, rem) = c.reserve(0, 0, Instant::now(), wall).unwrap();
        assert_eq!(rem.requests, Some(59 - i));
        r.settle(Some(used(0)));
    }
    match c.reserve(0, 0, Instant::now(), wall) {
        Err(Refusal::Rate {
            what: "requests",
            retry_after,
        }) => assert_eq!(retry_after, Duration::from_secs(1)),
        other => panic!("{other:?}"),
    }
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(c.reserve(0, 0, Instant::now(), wall).is_ok());
}

#[tokio::test(start_paused = true)]
async fn tokens_are_reserved_then_settled() {
    let c = limiter(ConsumerLimits {
        tokens_per_minute: Some(1000),
        ..Default::default()
    });
    let wall = SystemTime::now();
    let (a, rem) = c.reserve(600, 0, Instant::now(), wall).unwrap();
    assert_eq!(rem.tokens, Some(400));
    // A second 600 does not fit while the first is reserved...
    match c.reserve(600, 0, Instant::now(), wall) {
        Err(Refusal::Rate {
            what: "tokens",
            retry_after,
        }) => assert_eq!(retry_after, Duration::from_secs(12)),
        other => panic!("{other:?}"),
    }
    // ... but once the first turns out to have used 100, it does.
    a.settle(Some(used(100)));
    let (b, rem) = c.reserve(600, 0, Instant::now(), wall).unwrap();
    assert_eq!(rem.tokens, Some(300));
    // Using more than reserved goes into debt.
    b.settle(Some(used(1000)));
    assert!(matches!(
        c.reserve(1, 0, Instant::now(), wall),
        Err(Refusal::Rate { .. })
    ));
    tokio::time::advance(Duration::from_secs(60)).await;
    // The minute's refill pays the 100-token debt first.
    assert!(c.reserve(1000, 0, Instant::now(), wall).is_err());
    assert_eq!(
        c.reserve(900, 0, Instant::now(), wall).unwrap().1.tokens,
        Some(0)
    );
}

#[tokio::test(start_paused = true)]
async fn quotas_use_fixed_utc_windows() {
    let c = limiter(ConsumerLimits {
        token_quota: Some(Quota {
            period: QuotaPeriod::Day,
            tokens: 1000,
        }),
        ..Default::default()
    });
    let day = at("Thu, 26 Nov 2026 23:59:00 GMT");
    let (r, _) = c.reserve(900, 0, Instant::now(), day).unwrap();
    r.settle(Some(used(950)));
    match c.reserve(100, 0, Instant::now(), day) {
        Err(Refusal::Quota {
            period: QuotaPeriod::Day,
            resets_in,
        }) => assert_eq!(resets_in, Duration::from_secs(60)),
        other => panic!("{other:?}"),
    }
    assert!(
        c.reserve(50, 0, Instant::now(), day).is_ok(),
        "what is left can still be used"
    );
    let next_day = at("Fri, 27 Nov 2026 00:00:00 GMT");
    assert!(
        c.reserve(900, 0, Instant::now(), next_day).is_ok(),
        "a new day, a new quota"
    );
}

#[test]
fn month_windows_follow_the_calendar() {
    let nov = at("Mon, 30 Nov 2026 12:00:00 GMT");
    let dec = at("Tue, 01 Dec 2026 00:00:00 GMT");
    assert_eq!(
        window_of(QuotaPeriod::Month, dec),
        window_of(QuotaPeriod::Month, nov) + 1
    );
    assert_eq!(
        until_next_window(QuotaPeriod::Month, nov),
        Duration::from_secs(12 * 3600)
    );
    let leap = at("Tue, 29 Feb 2028 10:00:00 GMT");
    assert_eq!(
        until_next_window(QuotaPeriod::Month, leap),
        Duration::from_secs(14 * 3600)
    );
    assert_eq!(civil_from_days(0), (1970, 1, 1));
    assert_eq!(days_from_civil(2026, 11, 26), 20_783);
}

/// A limiter for one consumer, `team`, with these overall and per-deployment limits.
fn team(limits: ConsumerLimits, per_deployment: Vec<(String, ConsumerLimits)>) -> Limiter {
    Limiter::new(
        &[ConsumerConfig {
            name: "team".into(),
            keys: Vec::new(),
            models: None,
            fallbacks: true,
            jwt: None,
            limits,
            deployment_limits: per_deployment,
        }],
        500,
        None,
        None,
    )
}

#[tokio::test(start_paused = true)]
async fn per_deployment_limits_apply_on_top_and_all_or_nothing() {
    let l = team(
        ConsumerLimits {
            requests_per_minute: Some(100),
            ..Default::default()
        },
        vec![(
            "gpt-4o".into(),
            ConsumerLimits {
                requests_per_minute: Some(2),
                ..Default::default()
            },
        )],
    );
    let wall = SystemTime::now();
    let body = Bytes::from_static(b"{}");
    let admit = async |d: &str| {
        l.admit("team", Some(d), None, &body, Instant::now(), wall)
            .await
    };
    let a = admit("gpt-4o").await.unwrap().unwrap();
    assert_eq!(a.remaining.requests, Some(1), "the tighter of 99 and 1");
    admit("gpt-4o").await.unwrap().unwrap();
    let refused = admit("gpt-4o").await;
    assert!(matches!(
        refused,
        Err(Refusal::Rate {
            what: "requests",
            ..
        })
    ));
    // The refusal gave back the overall slot it had taken: three admitted, 97 left, not 96.
    let other = admit("gpt-4o-mini").await.unwrap().unwrap();
    assert_eq!(other.remaining.requests, Some(97));
    let stranger = l
        .admit("stranger", None, None, &body, Instant::now(), wall)
        .await;
    assert!(stranger.unwrap().is_none());
}

/// A request that goes on to a fallback gives back the tokens it held on the asked
/// deployment's own limits and is counted on the fallback's; its overall limits hold it once.
#[tokio::test(start_paused = true)]
async fn a_fallback_moves_the_tokens_to_the_deployment_that_served() {
    let per = |tokens| ConsumerLimits {
        tokens_per_minute: Some(tokens),
        ..Default::default()
    };
    let l = team(
        ConsumerLimits {
            requests_per_minute: Some(10),
            tokens_per_minute: Some(100_000),
            ..Default::default()
        },
        vec![("gpt-4o".into(), per(10_000)), ("mini".into(), per(5_000))],
    );
    let wall = SystemTime::now();
    let body =
        Bytes::from_static(br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":100}"#);
    let now = Instant::now();
    let a = l
        .admit("team", Some("gpt-4o"), None, &body, now, wall)
        .await
        .unwrap()
        .unwrap();
    let held = 10_000 - a.remaining.tokens.unwrap();
    assert!(held > 100, "the estimate is held on gpt-4o: {held}");
    let mut admission = Some(a);
    admission.as_mut().unwrap().leave("gpt-4o");
    l.enter(&mut admission, "team", "mini", &body, now, wall)
        .await
        .unwrap();
    let a = admission.unwrap();
    assert_eq!(a.remaining.tokens, Some(5_000 - held), "held on mini now");
    a.settle(Some(used(40)));
    // gpt-4o got its tokens back; mini and the overall limits were charged what was used.
    let probe = |d: &'static str| {
        let l = &l;
        let body = Bytes::from_static(b"{}");
        async move {
            l.admit("team", Some(d), None, &body, now, wall)
                .await
                .unwrap()
                .unwrap()
        }
    };
    let gpt = probe("gpt-4o").await;
    assert_eq!(
        gpt.remaining.requests,
        Some(8),
        "the overall request count: two, once each"
    );
    let on_gpt = 10_000 - gpt.remaining.tokens.unwrap();
    let mini = probe("mini").await;
    let on_mini = 5_000 - mini.remaining.tokens.unwrap();
    // Each probe holds its own small estimate (the same on both deployments).
    assert_eq!(on_mini - on_gpt, 40, "gpt-4o {on_gpt}, mini {on_mini}");
}

/// A budget holds each request's estimated cost and is settled with what it cost; spent, it
/// refuses until the next window, as a token quota does.
#[tokio::test(start_paused = true)]
async fn a_budget_is_reserved_settled_and_spent() {
    let c = limiter_for(
        &ConsumerLimits {
            budget: Some(crate::config::Budget {
                period: QuotaPeriod::Day,
                micros: 1_000,
            }),
            ..Default::default()
        },
        None,
        Instant::now(),
    )
    .unwrap();
    let wall = SystemTime::now();
    let (r, rem) = c.reserve(10, 300, Instant::now(), wall).unwrap();
    assert_eq!(rem.budget, Some((700, 1_000)));
    r.settle(Some(Used {
        tokens: 12,
        cost: 500,
    }));
    let (r, rem) = c.reserve(10, 300, Instant::now(), wall).unwrap();
    assert_eq!(rem.budget, Some((200, 1_000)), "500 spent, 300 held");
    r.settle(Some(Used {
        tokens: 12,
        cost: 600,
    }));
    match c.reserve(10, 1, Instant::now(), wall) {
        Err(Refusal::Budget { period, resets_in }) => {
            assert_eq!(period, QuotaPeriod::Day);
            assert!(resets_in <= Duration::from_secs(86_400));
        }
        other => panic!("{other:?}"),
    }
    // The next day's window starts afresh.
    let tomorrow = wall + Duration::from_secs(86_400);
    assert!(c.reserve(10, 300, Instant::now(), tomorrow).is_ok());
}
