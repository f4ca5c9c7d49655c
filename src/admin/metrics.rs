//! `GET /metrics`: the registry, and the families read at scrape time (backend states,
//! credentials).

use super::AdminState;
use crate::live::Snapshot;

/// A label value as the exposition format wants it.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Each backend's state per deployment, as gauges (1 for the current state).
fn backend_state_metrics(rt: &Snapshot, out: &mut String) {
    let proxy = &rt.proxy;
    let balancer = proxy.balancer();
    let now = tokio::time::Instant::now();
    out.push_str(
        "# HELP switchyard_backend_state Backend state per deployment (1 for the current state).\n",
    );
    out.push_str("# TYPE switchyard_backend_state gauge\n");
    for t in balancer.tables() {
        for (idx, b) in proxy.backends.iter().enumerate() {
            let Some(st) = t.status(idx, now) else {
                continue;
            };
            let current = if balancer.policy().is_drained(idx) {
                "drained"
            } else {
                match st.availability {
                    crate::balancer::Availability::Ready => "healthy",
                    crate::balancer::Availability::Cooling(_) => "cooling_down",
                    crate::balancer::Availability::Open(_) => "circuit_open",
                    crate::balancer::Availability::Probing => "probing",
                }
            };
            for s in [
                "healthy",
                "cooling_down",
                "circuit_open",
                "probing",
                "drained",
            ] {
                out.push_str(&format!(
                    "switchyard_backend_state{{deployment=\"{}\",backend=\"{}\",state=\"{s}\"}} {}\n",
                    esc(t.name()),
                    esc(&b.name),
                    u8::from(s == current)
                ));
            }
        }
    }
}

/// The registry's metrics plus backend states and each credential's state and token lifetime,
/// read at scrape time.
pub(super) fn render_metrics(state: &AdminState) -> String {
    let mut out = state.metrics.render();
    // OpenMetrics ends with `# EOF`; the families computed here go before it.
    let eof = out.ends_with("# EOF\n");
    if eof {
        out.truncate(out.len() - "# EOF\n".len());
    }
    let rt = state.gateway.snapshot();
    backend_state_metrics(&rt, &mut out);
    store_credential_metrics(state, &mut out);
    if rt.credentials.is_empty() {
        if eof {
            out.push_str("# EOF\n");
        }
        return out;
    }
    out.push_str("# HELP switchyard_credential_state Entra credential state per backend (1 for the current state).\n");
    out.push_str("# TYPE switchyard_credential_state gauge\n");
    let mut expiry = String::new();
    for p in &rt.credentials {
        let st = p.status();
        for backend in &p.backends() {
            for s in ["starting", "ready", "stale", "failing", "rejected"] {
                out.push_str(&format!(
                    "switchyard_credential_state{{backend=\"{backend}\",kind=\"{}\",state=\"{s}\"}} {}\n",
                    p.kind(),
                    u8::from(st.state.as_str() == s)
                ));
            }
            if let Some(left) = st.expires_in {
                expiry.push_str(&format!(
                    "switchyard_credential_expiry_seconds{{backend=\"{backend}\"}} {}\n",
                    left.as_secs()
                ));
            }
        }
    }
    out.push_str("# HELP switchyard_credential_expiry_seconds Seconds left on each backend's current token.\n");
    out.push_str("# TYPE switchyard_credential_expiry_seconds gauge\n");
    out.push_str(&expiry);
    if eof {
        out.push_str("# EOF\n");
    }
    out
}

/// The limits store's Entra ID credential, when Redis signs the gateway in with one.
fn store_credential_metrics(state: &AdminState, out: &mut String) {
    let Some(p) = state.shared.as_ref().and_then(|s| s.credential()) else {
        return;
    };
    let st = p.status();
    out.push_str("# HELP switchyard_limits_store_credential_state The limits store's Entra ID credential state (1 for the current state).\n");
    out.push_str("# TYPE switchyard_limits_store_credential_state gauge\n");
    for s in ["starting", "ready", "stale", "failing", "rejected"] {
        out.push_str(&format!(
            "switchyard_limits_store_credential_state{{kind=\"{}\",state=\"{s}\"}} {}\n",
            p.kind(),
            u8::from(st.state.as_str() == s)
        ));
    }
    if let Some(left) = st.expires_in {
        out.push_str("# HELP switchyard_limits_store_credential_expiry_seconds Seconds left on the limits store's current token.\n");
        out.push_str("# TYPE switchyard_limits_store_credential_expiry_seconds gauge\n");
        out.push_str(&format!(
            "switchyard_limits_store_credential_expiry_seconds {}\n",
            left.as_secs()
        ));
    }
}
