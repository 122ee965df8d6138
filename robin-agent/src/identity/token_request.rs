//! The `token_request` source: asks the Kubernetes API for a ServiceAccount token with a given
//! audience (`POST /api/v1/namespaces/{ns}/serviceaccounts/{sa}/token`), bound to the pod when
//! the agent knows it. The request and response are k8s-openapi's `TokenRequest`, sent
//! through [`crate::kube::Endpoint`]: kube-rs, with the agent's credential read per call.
use std::{path::PathBuf, sync::Arc, time::Duration};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use serde::Deserialize;

use super::{
    IdentityContext, IdentityError, IdentitySource, PodRef, Token, TokenFuture,
    cache::{CacheKey, Fetched, TokenCache},
    jwt_claims, jwt_lifetime,
};
use crate::{
    kube::{CallError, CallLimits, Endpoint, EndpointConfig},
    secret::sanitize,
};

pub const DEFAULT_API_SERVER: &str = "https://kubernetes.default.svc";

fn default_api_server() -> String {
    DEFAULT_API_SERVER.to_owned()
}

fn default_expiration() -> u64 {
    3600
}

/// `source = { kind = "token_request", audience = "...", ... }`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenRequestConfig {
    pub audience: String,
    #[serde(default = "default_expiration")]
    pub expiration_seconds: u64,
    #[serde(default = "default_api_server")]
    pub api_server: String,
    /// Defaults to the pod's namespace, else the mounted `namespace` file.
    pub namespace: Option<String>,
    /// Defaults to the pod's ServiceAccount, else the `sub` of the agent's own token.
    pub service_account: Option<String>,
    /// Defaults to the mounted `ca.crt`.
    pub ca_file: Option<PathBuf>,
    /// The agent's credential for the API server; defaults to the mounted `token`, re-read on
    /// every fetch (it rotates).
    pub token_file: Option<PathBuf>,
    /// Plain `http://` to a loopback `api_server` (a test double, `kubectl proxy`); never
    /// anywhere else.
    #[serde(default)]
    pub allow_insecure_http: bool,
}

pub struct TokenRequestSource {
    endpoint: Endpoint,
    namespace: String,
    service_account: String,
    audience: String,
    expiration_seconds: u64,
    pod: Option<PodRef>,
    cache: Arc<TokenCache>,
    key: CacheKey,
}

impl std::fmt::Debug for TokenRequestSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// A Kubernetes object name segment: DNS-1123 label characters only, so it cannot alter the path.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

impl TokenRequestSource {
    pub fn new(cfg: &TokenRequestConfig, ctx: &IdentityContext) -> Result<Self, IdentityError> {
        let sa_dir = &ctx.service_account_dir;
        let token_file = cfg
            .token_file
            .clone()
            .unwrap_or_else(|| sa_dir.join("token"));
        let pod = ctx.pod.clone();
        let (namespace, service_account) = resolve_names(cfg, sa_dir, &token_file, pod.as_ref())?;
        // Validation order is kept stable so the same misconfiguration reports the same error.
        check_pod_binding(pod.as_ref(), &namespace, &service_account)?;
        check_names(&namespace, &service_account)?;
        check_request(cfg)?;
        let endpoint = api_endpoint(cfg, ctx, token_file)?;
        let pod_uid = pod.as_ref().map(|p| p.uid.as_str()).unwrap_or("");
        let key = CacheKey(format!(
            "token_request|{}|{namespace}/{service_account}|aud={}|exp={}|pod={pod_uid}",
            endpoint.server(),
            cfg.audience,
            cfg.expiration_seconds
        ));
        Ok(Self {
            endpoint,
            namespace,
            service_account,
            audience: cfg.audience.clone(),
            expiration_seconds: cfg.expiration_seconds,
            pod,
            cache: ctx.cache.clone(),
            key,
        })
    }

    async fn fetch(&self) -> Result<Fetched, IdentityError> {
        let origin = self.describe();
        let protocol = |detail: String| IdentityError::Protocol {
            origin: origin.clone(),
            detail,
        };
        let body = self
            .endpoint
            .call(self.request())
            .await
            .map_err(|e| match e {
                CallError::ReadCredential { path, source } => IdentityError::Read { path, source },
                CallError::InvalidCredential { path, source } => IdentityError::Invalid {
                    origin: format!("agent credential {}", path.display()),
                    source,
                },
                other => protocol(other.to_string()),
            })?;
        // serde_json's message names a position and a category, never the token.
        let parsed: TokenRequest = serde_json::from_slice(&body)
            .map_err(|e| protocol(format!("bad TokenRequest json: {e}")))?;
        let raw = parsed.status.map(|s| s.token).unwrap_or_default();
        let token = Token::parse(&raw).map_err(|source| IdentityError::Invalid {
            origin: origin.clone(),
            source,
        })?;
        // The API server may shorten the lifetime; the token's own exp is authoritative.
        let lifetime = jwt_lifetime(&token).unwrap_or(Duration::from_secs(self.expiration_seconds));
        Ok(Fetched { token, lifetime })
    }

    /// `POST .../serviceaccounts/{sa}/token`, bound to the pod when there is one.
    fn request(&self) -> http::Request<Vec<u8>> {
        let body = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![self.audience.clone()],
                expiration_seconds: Some(self.expiration_seconds as i64),
                bound_object_ref: self.pod.as_ref().map(|p| BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(p.name.clone()),
                    uid: Some(p.uid.clone()),
                }),
            },
            ..TokenRequest::default()
        };
        let body = serde_json::to_vec(&body).expect("serializing a TokenRequest cannot fail");
        let path = format!(
            "/api/v1/namespaces/{}/serviceaccounts/{}/token",
            self.namespace, self.service_account
        );
        http::Request::post(path)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body)
            .expect("the names in the path are checked DNS-1123 names")
    }
}

impl IdentitySource for TokenRequestSource {
    fn describe(&self) -> String {
        format!(
            "token_request:{}/{}/{} aud={}",
            self.endpoint.server(),
            self.namespace,
            self.service_account,
            self.audience
        )
    }

    fn token(&self) -> TokenFuture<'_> {
        Box::pin(self.cache.get(&self.key, || self.fetch()))
    }

    fn cache_key(&self) -> Option<&CacheKey> {
        Some(&self.key)
    }
}

/// Namespace and ServiceAccount to ask for: config first, then the pod, then the agent's own
/// mounted files (read only when needed, so a pod-bound agent does not require them).
fn resolve_names(
    cfg: &TokenRequestConfig,
    sa_dir: &std::path::Path,
    token_file: &std::path::Path,
    pod: Option<&PodRef>,
) -> Result<(String, String), IdentityError> {
    let namespace = match (&cfg.namespace, pod) {
        (Some(ns), _) => ns.clone(),
        (None, Some(p)) => p.namespace.clone(),
        (None, None) => read_small(&sa_dir.join("namespace"))?,
    };
    let service_account = match (
        &cfg.service_account,
        pod.and_then(|p| p.service_account.as_ref()),
    ) {
        (Some(sa), _) => sa.clone(),
        (None, Some(sa)) => sa.clone(),
        (None, None) => own_service_account(token_file, &namespace)?,
    };
    Ok((namespace, service_account))
}

/// The API server binds a token to a pod only for the pod's own namespace and ServiceAccount:
/// fail here, once, rather than on every request.
fn check_pod_binding(
    pod: Option<&PodRef>,
    namespace: &str,
    service_account: &str,
) -> Result<(), IdentityError> {
    let Some(p) = pod else {
        return Ok(());
    };
    let own_sa = p.service_account.as_deref().unwrap_or(service_account);
    if namespace != p.namespace || service_account != own_sa {
        return Err(IdentityError::Config(format!(
            "token_request for {}/{}: namespace and service_account must be the pod's ({}/{})",
            sanitize(namespace, 64),
            sanitize(service_account, 64),
            sanitize(&p.namespace, 64),
            sanitize(own_sa, 64)
        )));
    }
    Ok(())
}

/// Both names go into the URL path; reject anything that could alter it.
fn check_names(namespace: &str, service_account: &str) -> Result<(), IdentityError> {
    for (what, v) in [
        ("namespace", namespace),
        ("service_account", service_account),
    ] {
        if !valid_name(v) {
            return Err(IdentityError::Config(format!(
                "{what} {:?} is not a valid name",
                sanitize(v, 64)
            )));
        }
    }
    Ok(())
}

fn check_request(cfg: &TokenRequestConfig) -> Result<(), IdentityError> {
    // The API server refuses shorter lifetimes; fail at startup rather than per request.
    if !(600..=u32::MAX as u64).contains(&cfg.expiration_seconds) {
        return Err(IdentityError::Config(
            "token_request expiration_seconds must be at least 600".into(),
        ));
    }
    if cfg.audience.is_empty() {
        return Err(IdentityError::Config(
            "token_request audience is empty".into(),
        ));
    }
    Ok(())
}

/// The API server, checked and its CA read up front.
fn api_endpoint(
    cfg: &TokenRequestConfig,
    ctx: &IdentityContext,
    token_file: PathBuf,
) -> Result<Endpoint, IdentityError> {
    let ca_file = cfg
        .ca_file
        .clone()
        .unwrap_or_else(|| ctx.service_account_dir.join("ca.crt"));
    Endpoint::new(EndpointConfig {
        url: &cfg.api_server,
        ca_file: Some(&ca_file),
        system_roots: false,
        token_file,
        allow_plain_loopback: cfg.allow_insecure_http,
        limits: CallLimits {
            connect_timeout: ctx.http.connect_timeout,
            total_timeout: ctx.http.total_timeout,
            max_body: ctx.http.max_body,
        },
    })
    .map_err(|e| IdentityError::Config(format!("token_request api_server: {e}")))
}

fn read_small(path: &std::path::Path) -> Result<String, IdentityError> {
    let raw = std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(raw.trim().to_owned())
}

/// The agent's own ServiceAccount name from its token's `sub`
/// (`system:serviceaccount:<ns>:<name>`).
fn own_service_account(
    token_file: &std::path::Path,
    namespace: &str,
) -> Result<String, IdentityError> {
    let raw = read_small(token_file)?;
    let token = Token::parse(&raw).map_err(|source| IdentityError::Invalid {
        origin: format!("agent credential {}", token_file.display()),
        source,
    })?;
    let sub = jwt_claims(&token).and_then(|c| c.sub).unwrap_or_default();
    match sub
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'))
    {
        Some((ns, name)) if ns == namespace => Ok(name.to_owned()),
        _ => Err(IdentityError::Config(
            "service_account not set and not derivable from the mounted token".into(),
        )),
    }
}
