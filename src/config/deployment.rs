//! `[[deployments]]`: what each backend calls a deployment, its fallbacks and its price.

/// A deployment clients ask for, and what each backend that serves it calls it.
#[derive(Debug, Clone)]
pub struct DeploymentConfig {
    pub name: String,
    /// (index into `Config::backends`, the deployment's name on that backend), in config order.
    pub backends: Vec<(usize, String)>,
    /// Priority and weight of a backend for this deployment, where they differ from the
    /// backend's own: (index into `Config::backends`, priority, weight).
    pub ranks: Vec<(usize, u32, u32)>,
    /// Deployments (configured ones, client-facing names) tried in turn when this one cannot
    /// serve a request; empty: none.
    pub fallbacks: Vec<String>,
    /// What makes a request go on to the next of `fallbacks`.
    pub fallback_on: FallbackOn,
    /// What its tokens cost; no cost is counted without one.
    pub price: Option<Price>,
}

/// What makes a request go on to a deployment's next fallback (`fallback_on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FallbackOn {
    /// Every backend of the deployment is rate limited (cooling down, or answered 429).
    pub throttled: bool,
    /// Every backend of the deployment is down (circuit open, or failed).
    pub unavailable: bool,
    /// A 400 whose error code is `context_length_exceeded`: the prompt is too long for it.
    pub context_length_exceeded: bool,
    /// A 400 whose error code is `content_filter`: its filter refused the prompt.
    pub content_filter: bool,
}

impl Default for FallbackOn {
    fn default() -> Self {
        Self {
            throttled: true,
            unavailable: true,
            context_length_exceeded: false,
            content_filter: false,
        }
    }
}

impl FallbackOn {
    /// The `fallback_on` values, as written in the config.
    pub const NAMES: [&'static str; 4] = [
        "throttled",
        "unavailable",
        "context_length_exceeded",
        "content_filter",
    ];

    /// Whether a 400 with this error code calls for the next fallback.
    pub fn on_code(&self, code: &str) -> bool {
        match code {
            "context_length_exceeded" => self.context_length_exceeded,
            "content_filter" => self.content_filter,
            _ => false,
        }
    }

    /// Whether any 400's error code calls for a fallback (its body is then read).
    pub fn on_any_code(&self) -> bool {
        self.context_length_exceeded || self.content_filter
    }

    /// The values set, as written in the config.
    pub fn names(&self) -> Vec<&'static str> {
        let set = [
            self.throttled,
            self.unavailable,
            self.context_length_exceeded,
            self.content_filter,
        ];
        Self::NAMES
            .iter()
            .zip(set)
            .filter_map(|(n, on)| on.then_some(*n))
            .collect()
    }
}

/// What a deployment's tokens cost, per million (`[[deployments]] price`), in `[usage] currency`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    /// Prompt tokens served from the prompt cache (`input` when not given).
    pub cached_input: f64,
    pub output: f64,
}

impl Price {
    /// The cost of one request's usage: uncached prompt tokens at `input`, cached ones at
    /// `cached_input`, completion tokens (reasoning and audio among them) at `output`.
    pub fn cost(&self, u: &crate::usage::Usage) -> f64 {
        let cached = u.cached_tokens.min(u.prompt_tokens);
        let fresh = u.prompt_tokens - cached;
        (fresh as f64 * self.input
            + cached as f64 * self.cached_input
            + u.completion_tokens as f64 * self.output)
            / 1_000_000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::time::Duration;

    fn parse(extra: &str) -> Result<Config, crate::config::ConfigError> {
        let text = format!(
            "[[backends]]\nname = \"east\"\nurl = \"http://127.0.0.1:1\"\nauth = {{ type = \"none\" }}\n[[deployments]]\nname = \"gpt-4o\"\nbackends = {{ east = \"gpt-4o\" }}\n{extra}"
        );
        Config::parse(&text, &|_| None)
    }

    #[test]
    fn prices_are_per_million_tokens_and_cached_input_defaults_to_input() {
        let c = parse("price = { input = 2.5, output = 10 }\n").unwrap();
        let p = c.deployments[0].price.unwrap();
        assert_eq!(p.cached_input, 2.5);
        assert_eq!(c.usage.currency, "USD");
        let p = Price {
            input: 2.5,
            cached_input: 1.25,
            output: 10.0,
        };
        let u = crate::usage::Usage {
            prompt_tokens: 1_000_000,
            cached_tokens: 400_000,
            completion_tokens: 100_000,
            total_tokens: 1_100_000,
            ..Default::default()
        };
        // 600,000 fresh at 2.50, 400,000 cached at 1.25, 100,000 out at 10.00.
        assert!((p.cost(&u) - (1.5 + 0.5 + 1.0)).abs() < 1e-12);

        let e = parse("price = { input = -1, output = 10 }\n").unwrap_err();
        assert_eq!(e.path, "deployments[0].price.input");
        let e = parse("price = { input = 1, output = 10, cached = 1 }\n").unwrap_err();
        assert!(e.to_string().contains("cached"), "{e}");
        let e = parse("[usage]\ncurrency = \"dollars\"\n").unwrap_err();
        assert_eq!(e.path, "usage.currency");
        assert_eq!(
            parse("[usage]\ncurrency = \"EUR\"\n")
                .unwrap()
                .usage
                .currency,
            "EUR"
        );
        let c = parse("").unwrap();
        assert_eq!(c.usage.retention, Duration::from_secs(35 * 86_400));
        let c = parse("[usage]\nretention = \"90d\"\n").unwrap();
        assert_eq!(c.usage.retention, Duration::from_secs(90 * 86_400));
        for bad in ["\"10m\"", "\"900d\"", "\"soon\""] {
            let e = parse(&format!("[usage]\nretention = {bad}\n")).unwrap_err();
            assert_eq!(e.path, "usage.retention", "{bad}");
        }
    }

    #[test]
    fn a_budget_is_per_day_or_month_in_millionths() {
        let consumer = |budget: &str| {
            parse(&format!(
                "[[consumers]]\nname = \"a\"\nkey = \"a-key-0123456789abc\"\nbudget = {budget}\n"
            ))
        };
        let c = consumer("{ period = \"month\", amount = 500.25 }").unwrap();
        let b = c.consumers[0].limits.budget.unwrap();
        assert_eq!(
            (b.period, b.micros),
            (crate::config::QuotaPeriod::Month, 500_250_000)
        );
        assert!(c.consumers[0].limits.counts_tokens());
        let e = consumer("{ period = \"hour\", amount = 1 }").unwrap_err();
        assert_eq!(e.path, "consumers[0].budget.period");
        let e = consumer("{ period = \"day\", amount = 0 }").unwrap_err();
        assert_eq!(e.path, "consumers[0].budget.amount");
    }
}
