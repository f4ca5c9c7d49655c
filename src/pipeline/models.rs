//! The gateway's own model list: `GET /v1/models`, `/openai/v1/models` and `/openai/models`
//! (and `…/models/{name}`) are answered from the config, not by a backend, which would list
//! its region's base models rather than the deployments the gateway serves. One entry per
//! `[[deployments]]` name, in the OpenAI list shape, only those the caller may use.

use http::Response;
use serde_json::{Value, json};

use crate::auth::inbound::Consumer;
use crate::body::BoxBody;
use crate::config::UnknownDeployments;
use crate::error::{ErrorKind, GatewayError};
use crate::live::Snapshot;

use super::read::Inbound;

/// The answer to a model-list request, or `None` for any other request.
pub(super) fn answer(
    snap: &Snapshot,
    inbound: &Inbound<'_>,
    consumer: Option<&Consumer>,
) -> Option<Result<Response<BoxBody>, GatewayError>> {
    if inbound.parts.method != http::Method::GET {
        return None;
    }
    let pq = &inbound.endpoint.path_and_query;
    let path = pq.split_once('?').map_or(&pq[..], |(p, _)| p);
    let rest = path
        .strip_prefix("/openai/v1/models")
        .or_else(|| path.strip_prefix("/openai/models"))
        .filter(|r| r.is_empty() || r.starts_with('/'))?;
    let visible = |name: &str| consumer.is_none_or(|c| c.may_use(name));
    let entry = |name: &str| json!({"id": name, "object": "model", "created": snap.built_at, "owned_by": "switchyard"});
    let deployments = snap.config.deployments.iter().map(|d| d.name.as_str());
    let body = match rest {
        "" | "/" => {
            let data: Vec<Value> = deployments.filter(|d| visible(d)).map(entry).collect();
            let mut list = json!({"object": "list", "data": data});
            if snap.config.routing.unknown_deployments == UnknownDeployments::Forward {
                list["note"] = "Deployment names not listed here are forwarded to the backends under their own name (routing.unknown_deployments = \"forward\").".into();
            }
            list
        }
        one => {
            let name = &one[1..];
            match deployments.into_iter().find(|d| *d == name) {
                Some(d) if visible(d) => entry(d),
                _ => {
                    let shown = super::context::first_chars(name, 64);
                    return Some(Err(GatewayError::new(
                        ErrorKind::ModelNotFound,
                        format!(
                            "The model '{shown}' does not exist or you do not have access to it."
                        ),
                    )));
                }
            }
        }
    };
    Some(Ok(super::json(&body)))
}
