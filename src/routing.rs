//! Which backends serve a deployment, and under which name. Pure lookups, no I/O.
//!
//! `[[deployments]]` entries map a client-facing name to backends and each backend's own name
//! for it (`eastus` may call it `gpt-4o`, `westus` `gpt-4o-2024-08-06`). A deployment no entry
//! names goes to every backend under its own name, unless `routing.unknown_deployments =
//! "reject"`, which answers 404.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{Config, FallbackOn, Price, UnknownDeployments};
use crate::error::{ErrorKind, GatewayError};

/// A backend that may serve a request, and the deployment name to use there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub backend: usize,
    /// The backend's name for the deployment when it differs from the client's; `None` keeps
    /// the request as the client sent it.
    pub rename: Option<Arc<str>>,
}

/// A deployment's fallbacks, in the order they are tried, and what sends a request on to them.
#[derive(Debug)]
pub struct Fallbacks {
    pub to: Vec<Arc<str>>,
    pub on: FallbackOn,
}

#[derive(Debug)]
pub struct Router {
    by_name: HashMap<String, Arc<[Candidate]>, crate::fnv::FnvBuild>,
    all: Arc<[Candidate]>,
    reject_unknown: bool,
    /// The deployments that have fallbacks (most configs: none, and no lookup is made).
    chains: HashMap<String, Fallbacks, crate::fnv::FnvBuild>,
    /// The deployments that have a price.
    prices: HashMap<String, Price, crate::fnv::FnvBuild>,
}

impl Router {
    pub fn new(config: &Config) -> Self {
        let all: Arc<[Candidate]> = (0..config.backends.len())
            .map(|backend| Candidate {
                backend,
                rename: None,
            })
            .collect();
        let by_name = config
            .deployments
            .iter()
            .map(|d| {
                let cands: Arc<[Candidate]> = d
                    .backends
                    .iter()
                    .map(|(backend, upstream)| Candidate {
                        backend: *backend,
                        rename: (upstream != &d.name).then(|| Arc::from(upstream.as_str())),
                    })
                    .collect();
                (d.name.clone(), cands)
            })
            .collect();
        let chains = config
            .deployments
            .iter()
            .filter(|d| !d.fallbacks.is_empty())
            .map(|d| {
                let to = d.fallbacks.iter().map(|f| Arc::from(f.as_str())).collect();
                (
                    d.name.clone(),
                    Fallbacks {
                        to,
                        on: d.fallback_on,
                    },
                )
            })
            .collect();
        let prices = config
            .deployments
            .iter()
            .filter_map(|d| Some((d.name.clone(), d.price?)))
            .collect();
        Self {
            by_name,
            all,
            reject_unknown: config.routing.unknown_deployments == UnknownDeployments::Reject,
            chains,
            prices,
        }
    }

    /// What `deployment`'s tokens cost, if it has a price.
    pub fn price(&self, deployment: &str) -> Option<Price> {
        if self.prices.is_empty() {
            return None;
        }
        self.prices.get(deployment).copied()
    }

    /// The fallbacks of `deployment`, if it has any.
    pub fn fallbacks(&self, deployment: &str) -> Option<&Fallbacks> {
        if self.chains.is_empty() {
            return None;
        }
        self.chains.get(deployment)
    }

    /// The candidates for a request naming `deployment` (in its path or its body's `model`).
    /// Requests that name none (files, batches, ...) may go to any backend.
    pub fn resolve(&self, deployment: Option<&str>) -> Result<Arc<[Candidate]>, GatewayError> {
        let Some(name) = deployment else {
            return Ok(self.all.clone());
        };
        if let Some(c) = self.by_name.get(name) {
            return Ok(c.clone());
        }
        if self.reject_unknown {
            let shown: String = name.chars().take(128).collect();
            return Err(GatewayError::new(
                ErrorKind::UnknownDeployment,
                format!(
                    "The deployment '{shown}' is not served by this gateway (no [[deployments]] entry names it)."
                ),
            ));
        }
        Ok(self.all.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            r#"
[[backends]]
name = "eastus"
url = "http://127.0.0.1:1"
auth = {{ type = "none" }}
[[backends]]
name = "westus"
url = "http://127.0.0.1:2"
auth = {{ type = "none" }}
[[backends]]
name = "swe"
url = "http://127.0.0.1:3"
auth = {{ type = "none" }}
[[deployments]]
name = "gpt-4o"
backends = {{ westus = "gpt-4o-2024-08-06", eastus = "gpt-4o" }}
{extra}"#
        );
        Config::parse(&text, &|_| None).unwrap()
    }

    #[test]
    fn maps_names_per_backend_in_config_order() {
        let r = Router::new(&config(""));
        let c = r.resolve(Some("gpt-4o")).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(
            c[0],
            Candidate {
                backend: 0,
                rename: None
            }
        );
        assert_eq!(c[1].backend, 1);
        assert_eq!(c[1].rename.as_deref(), Some("gpt-4o-2024-08-06"));
    }

    #[test]
    fn unknown_deployments_forward_or_404() {
        let r = Router::new(&config(""));
        assert_eq!(r.resolve(Some("other")).unwrap().len(), 3);
        assert_eq!(r.resolve(None).unwrap().len(), 3);
        let r = Router::new(&config("[routing]\nunknown_deployments = \"reject\"\n"));
        let e = r.resolve(Some("other")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnknownDeployment);
        assert!(e.message.contains("'other'"));
        assert_eq!(r.resolve(None).unwrap().len(), 3);
    }

    /// One backend, and a deployment mapped to a backend no entry names.
    const ONE_BACKEND: &str = r#"
[[backends]]
name = "eastus"
url = "http://127.0.0.1:1"
auth = { type = "none" }
[[deployments]]
name = "gpt-4o"
backends = { nowhere = "x" }
"#;

    #[test]
    fn bad_mappings_are_config_errors() {
        let text = ONE_BACKEND;
        let e = Config::parse(text, &|_| None).unwrap_err();
        assert_eq!(e.path, "deployments[0].backends.nowhere");
        let e = Config::parse(
            &text.replace("nowhere = \"x\"", "eastus = \"a/b\""),
            &|_| None,
        )
        .unwrap_err();
        assert_eq!(e.path, "deployments[0].backends.eastus");
    }

    #[test]
    fn fallback_chains_name_configured_deployments() {
        let mini = "[[deployments]]\nname = \"mini\"\nbackends = { swe = \"gpt-4o-mini\" }\n";
        let chain = |d: &str| format!("fallbacks = [\"mini\"]\n{d}\n{mini}");
        let r = Router::new(&config(&chain(
            "fallback_on = [\"throttled\", \"content_filter\"]",
        )));
        let f = r.fallbacks("gpt-4o").unwrap();
        assert_eq!(f.to.iter().map(|d| &**d).collect::<Vec<_>>(), ["mini"]);
        assert!(f.on.throttled && f.on.content_filter);
        assert!(!f.on.unavailable && !f.on.context_length_exceeded);
        assert!(r.fallbacks("mini").is_none());
        // The default: throttled and unavailable.
        let r = Router::new(&config(&chain("")));
        assert_eq!(r.fallbacks("gpt-4o").unwrap().on, FallbackOn::default());
        assert!(Router::new(&config("")).fallbacks("gpt-4o").is_none());

        let refused = |extra: &str| {
            let base = ONE_BACKEND.replace("nowhere = \"x\"", "eastus = \"gpt-4o\"");
            Config::parse(&format!("{base}{extra}"), &|_| None).unwrap_err()
        };
        let e = refused("fallbacks = [\"nowhere\"]\n");
        assert_eq!(e.path, "deployments[0].fallbacks[0]");
        assert!(e.to_string().contains("nowhere"), "{e}");
        let e = refused("fallbacks = [\"gpt-4o\"]\n");
        assert!(e.to_string().contains("itself"), "{e}");
        let e = refused(&chain("fallback_on = [\"slow\"]").replace("swe", "eastus"));
        assert_eq!(e.path, "deployments[0].fallback_on[0]");
        assert!(e.to_string().contains("context_length_exceeded"), "{e}");
        let e = refused("fallback_on = [\"throttled\"]\n");
        assert_eq!(e.path, "deployments[0].fallback_on");
        let e =
            refused(&format!("fallbacks = [\"mini\", \"mini\"]\n{mini}").replace("swe", "eastus"));
        assert_eq!(e.path, "deployments[0].fallbacks[1]");
    }
}
