//! Entra ID credentials for backends: which token flow, with which identity, for which scope.
//! Values the platform provides (`IDENTITY_ENDPOINT`, `AZURE_CLIENT_ID`, ...) are read here,
//! through the same lookup as `${VAR}`, so a missing one is a start-up error naming the field.

use std::path::PathBuf;

use super::raw::RawAuth;
use super::{ConfigError, Secret};

/// Azure OpenAI's token scope. Foundry endpoints also accept `https://ai.azure.com/.default`.
pub const DEFAULT_SCOPE: &str = "https://cognitiveservices.azure.com/.default";
/// Azure Cache for Redis' and Azure Managed Redis' token scope.
pub const REDIS_SCOPE: &str = "https://redis.azure.com/.default";
const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com/";
const DEFAULT_IMDS: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntraCredential {
    pub flow: EntraFlow,
    /// e.g. `https://cognitiveservices.azure.com/.default`.
    pub scope: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntraFlow {
    ManagedIdentity {
        id: Option<ManagedIdentityId>,
        source: MiSource,
    },
    WorkloadIdentity {
        tenant_id: String,
        client_id: String,
        /// Re-read at every token request: the platform rotates it.
        token_file: PathBuf,
        authority_host: String,
    },
    ClientSecret {
        tenant_id: String,
        client_id: String,
        secret: Secret,
        authority_host: String,
    },
    AzureCli {
        command: String,
    },
}

impl EntraFlow {
    pub fn kind(&self) -> &'static str {
        match self {
            EntraFlow::ManagedIdentity { .. } => "managed_identity",
            EntraFlow::WorkloadIdentity { .. } => "workload_identity",
            EntraFlow::ClientSecret { .. } => "client_secret",
            EntraFlow::AzureCli { .. } => "azure_cli",
        }
    }
}

impl EntraCredential {
    /// A one-line description for `switchyard check`: flow, identity, scope; never a secret.
    pub fn describe(&self) -> String {
        let what = match &self.flow {
            EntraFlow::ManagedIdentity { id, source } => {
                let who = match id {
                    None => "system-assigned".to_string(),
                    Some(ManagedIdentityId::ClientId(v)) => format!("client_id {v}"),
                    Some(ManagedIdentityId::ObjectId(v)) => format!("object_id {v}"),
                    Some(ManagedIdentityId::ResourceId(v)) => format!("resource_id {v}"),
                };
                let from = match source {
                    MiSource::AppService { endpoint, .. } => {
                        format!("IDENTITY_ENDPOINT {endpoint}")
                    }
                    MiSource::Imds { endpoint } => format!("IMDS {endpoint}"),
                };
                format!("managed identity ({who}) from {from}")
            }
            EntraFlow::WorkloadIdentity {
                tenant_id,
                client_id,
                token_file,
                ..
            } => format!(
                "workload identity (tenant {tenant_id}, client {client_id}, token file {})",
                token_file.display()
            ),
            EntraFlow::ClientSecret {
                tenant_id,
                client_id,
                ..
            } => {
                format!("client secret (tenant {tenant_id}, client {client_id})")
            }
            EntraFlow::AzureCli { command } => format!("Azure CLI (`{command}`)"),
        };
        format!("{what}, scope {}", self.scope)
    }
}

/// A user-assigned identity; absent means the system-assigned one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManagedIdentityId {
    ClientId(String),
    ObjectId(String),
    ResourceId(String),
}

/// Where managed-identity tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MiSource {
    /// App Service, Functions, Container Apps: `IDENTITY_ENDPOINT` with `X-IDENTITY-HEADER`.
    AppService { endpoint: String, header: Secret },
    /// VMs, VM scale sets, AKS nodes: the instance metadata service.
    Imds { endpoint: String },
}

/// `default_scope`: for a credential that names none ([`DEFAULT_SCOPE`] for backends,
/// [`REDIS_SCOPE`] for the limits store).
pub(super) fn validate(
    raw: RawAuth,
    at: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    default_scope: &str,
) -> Result<EntraCredential, ConfigError> {
    let field = |f: &str| format!("{at}.{f}");
    let env = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
    let scope_of = |s: Option<String>| -> Result<String, ConfigError> {
        let scope = s.unwrap_or_else(|| default_scope.to_string());
        if !(scope.starts_with("https://") || scope.starts_with("api://")) || scope.contains(' ') {
            return Err(ConfigError::field(
                field("scope"),
                format!("{scope:?} is not a scope like {default_scope:?}"),
            ));
        }
        Ok(scope)
    };
    let authority = |a: Option<String>| -> Result<String, ConfigError> {
        let a = a
            .or_else(|| env("AZURE_AUTHORITY_HOST"))
            .unwrap_or_else(|| DEFAULT_AUTHORITY.to_string());
        check_url(&a, &field("authority_host"))?;
        Ok(if a.ends_with('/') { a } else { format!("{a}/") })
    };
    let required = |v: Option<String>, key: &str, var: &str| -> Result<String, ConfigError> {
        v.or_else(|| env(var)).ok_or_else(|| {
            ConfigError::field(
                field(key),
                format!("not set, and environment variable {var} is not set"),
            )
        })
    };
    let flow_and_scope = match raw {
        RawAuth::ManagedIdentity {
            client_id,
            object_id,
            resource_id,
            scope,
            endpoint,
        } => {
            let ids: Vec<ManagedIdentityId> = [
                client_id.map(ManagedIdentityId::ClientId),
                object_id.map(ManagedIdentityId::ObjectId),
                resource_id.map(ManagedIdentityId::ResourceId),
            ]
            .into_iter()
            .flatten()
            .collect();
            if ids.len() > 1 {
                return Err(ConfigError::field(
                    at,
                    "give at most one of client_id, object_id, resource_id",
                ));
            }
            let source = match (endpoint, env("IDENTITY_ENDPOINT"), env("IDENTITY_HEADER")) {
                (Some(e), _, _) => {
                    check_url(&e, &field("endpoint"))?;
                    MiSource::Imds { endpoint: e }
                }
                (None, Some(endpoint), Some(header)) => {
                    check_url(&endpoint, "IDENTITY_ENDPOINT")?;
                    MiSource::AppService {
                        endpoint,
                        header: Secret::new(header),
                    }
                }
                _ => MiSource::Imds {
                    endpoint: DEFAULT_IMDS.to_string(),
                },
            };
            (
                EntraFlow::ManagedIdentity {
                    id: ids.into_iter().next(),
                    source,
                },
                scope,
            )
        }
        RawAuth::WorkloadIdentity {
            client_id,
            tenant_id,
            token_file,
            authority_host,
            scope,
        } => (
            EntraFlow::WorkloadIdentity {
                client_id: required(client_id, "client_id", "AZURE_CLIENT_ID")?,
                tenant_id: required(tenant_id, "tenant_id", "AZURE_TENANT_ID")?,
                token_file: PathBuf::from(required(
                    token_file,
                    "token_file",
                    "AZURE_FEDERATED_TOKEN_FILE",
                )?),
                authority_host: authority(authority_host)?,
            },
            scope,
        ),
        RawAuth::ClientSecret {
            tenant_id,
            client_id,
            client_secret,
            authority_host,
            scope,
        } => {
            for (k, v) in [
                ("tenant_id", &tenant_id),
                ("client_id", &client_id),
                ("client_secret", &client_secret),
            ] {
                if v.trim().is_empty() {
                    return Err(ConfigError::field(field(k), "must not be empty"));
                }
            }
            (
                EntraFlow::ClientSecret {
                    tenant_id,
                    client_id,
                    secret: Secret::new(client_secret),
                    authority_host: authority(authority_host)?,
                },
                scope,
            )
        }
        RawAuth::AzureCli { scope, command } => (
            EntraFlow::AzureCli {
                command: command.unwrap_or_else(|| "az".to_string()),
            },
            scope,
        ),
        RawAuth::ApiKey { .. } | RawAuth::None => {
            return Err(ConfigError::field(at, "not an Entra ID credential"));
        }
    };
    let (flow, scope) = flow_and_scope;
    Ok(EntraCredential {
        flow,
        scope: scope_of(scope)?,
    })
}

fn check_url(s: &str, path: &str) -> Result<(), ConfigError> {
    let ok = s
        .parse::<http::Uri>()
        .ok()
        .is_some_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
    if ok {
        Ok(())
    } else {
        Err(ConfigError::field(
            path,
            format!("{s:?} is not an http(s) URL"),
        ))
    }
}
