//! The `token_request` source: asks the Kubernetes API for a ServiceAccount token with a given
//! audience (`POST /api/v1/namespaces/{ns}/serviceaccounts/{sa}/token`), bound to the pod when
//! the agent knows it. Plain JSON over the hardened client; no Kubernetes client library.
use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::{
    IdentityContext, IdentityError, IdentitySource, PodRef, Token, TokenFuture,
    cache::{CacheKey, Fetched, TokenCache},
    http::{HttpClient, sanitize},
    jwt_claims, jwt_lifetime,
};
use std::sync::Arc;

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
    #[serde(default)]
    pub allow_insecure_http: bool,
}

pub struct TokenRequestSource {
    url: String,
    audience: String,
    expiration_seconds: u64,
    token_file: PathBuf,
    pod: Option<PodRef>,
    client: HttpClient,
    cache: Arc<TokenCache>,
    key: CacheKey,
}

impl std::fmt::Debug for TokenRequestSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TokenRequest<'a> {
    api_version: &'static str,
    kind: &'static str,
    spec: Spec<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Spec<'a> {
    audiences: [&'a str; 1],
    expiration_seconds: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    bound_object_ref: Option<BoundObjectRef<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BoundObjectRef<'a> {
    kind: &'static str,
    api_version: &'static str,
    name: &'a str,
    uid: &'a str,
}

#[derive(Deserialize)]
struct TokenRequestResponse {
    status: Option<Status>,
}

#[derive(Deserialize)]
struct Status {
    token: Option<String>,
}

#[derive(Deserialize)]
struct ApiStatus {
    message: Option<String>,
    reason: Option<String>,
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
        let (client, url) = api_client(cfg, ctx, &namespace, &service_account)?;
        let pod_uid = pod.as_ref().map(|p| p.uid.as_str()).unwrap_or("");
        let key = CacheKey(format!(
            "token_request|{url}|aud={}|exp={}|pod={pod_uid}",
            cfg.audience, cfg.expiration_seconds
        ));
        Ok(Self {
            url,
            audience: cfg.audience.clone(),
            expiration_seconds: cfg.expiration_seconds,
            token_file,
            pod,
            client,
            cache: ctx.cache.clone(),
            key,
        })
    }

    async fn fetch(&self) -> Result<Fetched, IdentityError> {
        let origin = self.describe();
        // Re-read each time: the agent's own projected token rotates.
        let credential = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|source| IdentityError::Read {
                path: self.token_file.clone(),
                source,
            })?;
        let credential = Token::parse(&credential).map_err(|source| IdentityError::Invalid {
            origin: format!("agent credential {}", self.token_file.display()),
            source,
        })?;
        let body = TokenRequest {
            api_version: "authentication.k8s.io/v1",
            kind: "TokenRequest",
            spec: Spec {
                audiences: [&self.audience],
                expiration_seconds: self.expiration_seconds,
                bound_object_ref: self.pod.as_ref().map(|p| BoundObjectRef {
                    kind: "Pod",
                    api_version: "v1",
                    name: &p.name,
                    uid: &p.uid,
                }),
            },
        };
        let body = serde_json::to_vec(&body).expect("serializing a TokenRequest cannot fail");
        let resp = self
            .client
            .post(
                &self.url,
                "application/json",
                Some(credential.expose()),
                body,
            )
            .await
            .map_err(|source| IdentityError::Http {
                origin: origin.clone(),
                source,
            })?;
        if !resp.status.is_success() {
            let detail = serde_json::from_slice::<ApiStatus>(&resp.body)
                .ok()
                .map(|s| {
                    format!(
                        "{} {}",
                        s.reason.unwrap_or_default(),
                        s.message.unwrap_or_default()
                    )
                })
                .unwrap_or_default();
            return Err(IdentityError::Protocol {
                origin,
                detail: format!(
                    "status {}: {}",
                    resp.status.as_u16(),
                    sanitize(detail.trim(), 128)
                ),
            });
        }
        let parsed: TokenRequestResponse =
            serde_json::from_slice(&resp.body).map_err(|e| IdentityError::Protocol {
                origin: origin.clone(),
                detail: format!("bad TokenRequest json: {e}"),
            })?;
        let raw = parsed
            .status
            .and_then(|s| s.token)
            .ok_or_else(|| IdentityError::Protocol {
                origin: origin.clone(),
                detail: "TokenRequest status has no token".into(),
            })?;
        let token =
            Token::parse(&raw).map_err(|source| IdentityError::Invalid { origin, source })?;
        // The API server may shorten the lifetime; the token's own exp is authoritative.
        let lifetime = jwt_lifetime(&token).unwrap_or(Duration::from_secs(self.expiration_seconds));
        Ok(Fetched { token, lifetime })
    }
}

impl IdentitySource for TokenRequestSource {
    fn describe(&self) -> String {
        format!("token_request:{} aud={}", self.url, self.audience)
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

/// The hardened client and the token endpoint URL, checked against it up front.
fn api_client(
    cfg: &TokenRequestConfig,
    ctx: &IdentityContext,
    namespace: &str,
    service_account: &str,
) -> Result<(HttpClient, String), IdentityError> {
    let http_err = |source| IdentityError::Http {
        origin: "token_request".into(),
        source,
    };
    let ca_file = cfg
        .ca_file
        .clone()
        .unwrap_or_else(|| ctx.service_account_dir.join("ca.crt"));
    let client = HttpClient::new(Some(&ca_file), cfg.allow_insecure_http, ctx.http.clone())
        .map_err(http_err)?;
    let base = cfg.api_server.trim_end_matches('/');
    let url =
        format!("{base}/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token");
    client.check_url(&url).map_err(http_err)?;
    Ok((client, url))
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
