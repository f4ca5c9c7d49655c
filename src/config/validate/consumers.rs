//! Consumers (keys, tokens, limits) and the limits store.

use super::*;

pub(super) fn validate_consumers(
    raw: Vec<raw::RawConsumer>,
    jwt_configured: bool,
) -> Result<Vec<ConsumerConfig>, ConfigError> {
    let mut out: Vec<ConsumerConfig> = Vec::with_capacity(raw.len());
    for (i, c) in raw.into_iter().enumerate() {
        let at = |field: &str| format!("consumers[{i}].{field}");
        let name = checked_name(&c.name, &at("name"))?;
        if let Some(j) = out.iter().position(|o| o.name == name) {
            return Err(ConfigError::field(
                at("name"),
                format!("duplicate consumer {name:?} (also consumers[{j}])"),
            ));
        }
        if c.jwt.is_some() && !jwt_configured {
            return Err(ConfigError::field(
                at("jwt"),
                "needs a [jwt] section saying which tokens to accept",
            ));
        }
        let mut keys = Vec::new();
        if c.key.is_some() || c.key_sha256.is_some() {
            keys.push(consumer_key(c.key, c.key_sha256, None, &at(""))?);
        }
        for (j, k) in c.keys.into_iter().flatten().enumerate() {
            let path = at(&format!("keys[{j}]."));
            let expires = match k.expires {
                None => None,
                Some(t) => Some(humantime::parse_rfc3339_weak(t.trim()).map_err(|e| {
                    ConfigError::field(
                        format!("{path}expires"),
                        format!("{t:?} is not an RFC 3339 time such as 2027-01-31T00:00:00Z ({e})"),
                    )
                })?),
            };
            keys.push(consumer_key(k.key, k.key_sha256, expires, &path)?);
        }
        if keys.is_empty() && c.jwt.is_none() {
            return Err(ConfigError::field(
                at("key"),
                "a consumer needs key, key_sha256, keys or jwt",
            ));
        }
        for (j, k) in keys.iter().enumerate() {
            if keys[..j].iter().any(|o| o.sha256 == k.sha256) {
                return Err(ConfigError::field(
                    at("keys"),
                    "the same key twice: give each key once",
                ));
            }
            if let Some(other) = out
                .iter()
                .position(|o| o.keys.iter().any(|o| o.sha256 == k.sha256))
            {
                return Err(ConfigError::field(
                    at("key"),
                    format!("the same key as consumers[{other}]: each consumer needs its own"),
                ));
            }
        }
        let mut limits = limit_set(
            c.requests_per_minute,
            c.tokens_per_minute,
            c.token_quota,
            &at(""),
        )?;
        limits.budget = c.budget.map(|b| budget(b, &at("budget"))).transpose()?;
        let mut deployment_limits = Vec::with_capacity(c.deployments.len());
        for (deployment, set) in c.deployments {
            let path = at(&format!("deployments.{deployment}."));
            if !valid_deployment_name(&deployment) {
                return Err(ConfigError::field(
                    path.trim_end_matches('.'),
                    format!("{deployment:?} is not a valid deployment name"),
                ));
            }
            let l = limit_set(
                set.requests_per_minute,
                set.tokens_per_minute,
                set.token_quota,
                &path,
            )?;
            deployment_limits.push((deployment, l));
        }
        if let Some(models) = &c.models {
            for (j, m) in models.iter().enumerate() {
                if !valid_deployment_name(m) {
                    return Err(ConfigError::field(
                        at(&format!("models[{j}]")),
                        format!("{m:?} is not a valid deployment name"),
                    ));
                }
            }
        }
        if let Some(j) = out.iter().position(|o| c.jwt.is_some() && o.jwt == c.jwt) {
            return Err(ConfigError::field(
                at("jwt"),
                format!("the same claim value as consumers[{j}]"),
            ));
        }
        out.push(ConsumerConfig {
            name,
            keys,
            jwt: c.jwt,
            models: c.models,
            fallbacks: c.fallbacks.unwrap_or(true),
            limits,
            deployment_limits,
        });
    }
    Ok(out)
}

/// One set of limits; `at` is the path prefix its keys are reported under (ends with '.').
/// `budget = { period = "day" | "month", amount = 500.0 }`.
fn budget(raw: raw::RawBudget, path: &str) -> Result<Budget, ConfigError> {
    if raw.period == QuotaPeriod::Hour {
        return Err(ConfigError::field(
            format!("{path}.period"),
            "a budget is per \"day\" or \"month\"",
        ));
    }
    if !raw.amount.is_finite() || raw.amount <= 0.0 || raw.amount > 1e12 {
        return Err(ConfigError::field(
            format!("{path}.amount"),
            format!(
                "{} is not an amount to spend (more than 0, in [usage] currency)",
                raw.amount
            ),
        ));
    }
    Ok(Budget {
        period: raw.period,
        micros: micros(raw.amount),
    })
}

pub(super) fn limit_set(
    rpm: Option<u32>,
    tpm: Option<u32>,
    quota: Option<raw::RawQuota>,
    at: &str,
) -> Result<ConsumerLimits, ConfigError> {
    let positive = |v: Option<u32>, key: &str| -> Result<Option<u32>, ConfigError> {
        match v {
            Some(0) => Err(ConfigError::field(
                format!("{at}{key}"),
                "must be at least 1 (leave it out for no limit)",
            )),
            other => Ok(other),
        }
    };
    let token_quota = match quota {
        None => None,
        Some(q) if q.tokens == 0 => {
            return Err(ConfigError::field(
                format!("{at}token_quota.tokens"),
                "must be at least 1",
            ));
        }
        Some(q) => Some(Quota {
            period: q.period,
            tokens: q.tokens,
        }),
    };
    Ok(ConsumerLimits {
        requests_per_minute: positive(rpm, "requests_per_minute")?,
        tokens_per_minute: positive(tpm, "tokens_per_minute")?,
        token_quota,
        budget: None,
    })
}

pub(super) fn validate_limits(
    raw: raw::RawLimits,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<LimitsConfig, ConfigError> {
    let store = match raw.store.as_deref() {
        None | Some("memory") => {
            let redis_keys = [
                ("redis_url", raw.redis_url.is_some()),
                ("fail_closed", raw.fail_closed.is_some()),
                ("redis_timeout", raw.redis_timeout.is_some()),
                ("redis_cluster", raw.redis_cluster.is_some()),
                ("redis_auth", raw.redis_auth.is_some()),
                ("redis_user", raw.redis_user.is_some()),
            ];
            if let Some((key, _)) = redis_keys.iter().find(|(_, set)| *set) {
                return Err(ConfigError::field(
                    format!("limits.{key}"),
                    "goes with store = \"redis\"",
                ));
            }
            LimitStore::Memory
        }
        Some("redis") => {
            let Some(url) = raw.redis_url else {
                return Err(ConfigError::field(
                    "limits.redis_url",
                    "required with store = \"redis\"",
                ));
            };
            let timeout = opt_duration(raw.redis_timeout, "limits.redis_timeout", 100)?;
            let cluster = raw.redis_cluster.unwrap_or(false);
            let target = RedisTarget::parse(&url, cluster)
                .map_err(|e| ConfigError::field("limits.redis_url", e))?;
            let auth = match raw.redis_auth {
                None => None,
                Some(a) => {
                    if target.has_password {
                        return Err(ConfigError::field(
                            "limits.redis_url",
                            "has a password, and limits.redis_auth signs in with Entra ID: keep one",
                        ));
                    }
                    if target.has_user {
                        return Err(ConfigError::field(
                            "limits.redis_url",
                            "names a user: with limits.redis_auth, set limits.redis_user instead",
                        ));
                    }
                    Some(super::credential::validate(
                        a,
                        "limits.redis_auth",
                        lookup,
                        super::credential::REDIS_SCOPE,
                    )?)
                }
            };
            let user = match raw.redis_user {
                None => None,
                Some(_) if auth.is_none() => {
                    return Err(ConfigError::field(
                        "limits.redis_user",
                        "goes with limits.redis_auth (a password sign-in names its user in redis_url)",
                    ));
                }
                Some(u)
                    if u.trim().is_empty()
                        || u.chars().any(|c| c.is_whitespace() || c.is_control()) =>
                {
                    return Err(ConfigError::field(
                        "limits.redis_user",
                        "must be a user name (the identity's object id), without spaces",
                    ));
                }
                Some(u) => Some(u),
            };
            LimitStore::Redis(RedisStore {
                url: Secret::new(url),
                fail_closed: raw.fail_closed.unwrap_or(false),
                timeout,
                cluster,
                auth,
                user,
            })
        }
        Some(other) => {
            return Err(ConfigError::field(
                "limits.store",
                format!("unknown store {other:?}: use \"memory\" or \"redis\""),
            ));
        }
    };
    Ok(LimitsConfig {
        completion_estimate: raw
            .completion_estimate
            .unwrap_or(DEFAULT_COMPLETION_ESTIMATE),
        store,
    })
}

pub(super) fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// One key, given as `key` or as `key_sha256` (never both); `path` is where its fields are.
fn consumer_key(
    key: Option<String>,
    key_sha256: Option<String>,
    expires: Option<std::time::SystemTime>,
    path: &str,
) -> Result<ConsumerKey, ConfigError> {
    let sha256 = match (key, key_sha256) {
        (Some(key), None) => {
            if key.len() < 16 {
                return Err(ConfigError::field(
                    format!("{path}key"),
                    "too short: use at least 16 characters (32 random bytes, hex or base64, is better)",
                ));
            }
            crate::config::sha256(key.as_bytes())
        }
        (None, Some(hex)) => parse_sha256(&hex).ok_or_else(|| {
            ConfigError::field(
                format!("{path}key_sha256"),
                "must be 64 hex digits (the SHA-256 of the key)",
            )
        })?,
        (Some(_), Some(_)) => {
            return Err(ConfigError::field(
                format!("{path}key"),
                "give key or key_sha256, not both",
            ));
        }
        (None, None) => {
            return Err(ConfigError::field(
                format!("{path}key"),
                "give key or key_sha256",
            ));
        }
    };
    Ok(ConsumerKey { sha256, expires })
}
